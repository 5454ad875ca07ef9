"""Float-exact graph rewrites run before quantization (pyquant.preparation runs them in
order, checks each on a calibration batch and reports it). One module per rewrite; each
function edits the model in place and returns how many places it changed."""
