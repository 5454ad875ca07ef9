// An onnxruntime custom-operator library that registers no operator.
//
// Quark's BF16 models need Quark's custom bfloat16 Q/DQ operators, so scripts written for
// Quark (the Ryzen AI tutorial's utils.py among them) register quark.onnx.get_library_path()
// with SessionOptions.register_custom_ops_library before running one. pyquant writes
// bfloat16 as standard Cast pairs, which onnxruntime runs as they are; pyquant.quark's
// get_library_path() returns this library so that such a script runs unchanged.
//
// onnxruntime loads the library and calls
//   OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api);
// a null status is success. The types are opaque here: nothing is read from them, so the
// library needs no onnxruntime header and works with any onnxruntime version.

#if defined(_WIN32)
#define PYQUANT_EXPORT __declspec(dllexport)
#else
#define PYQUANT_EXPORT __attribute__((visibility("default")))
#endif

extern "C" PYQUANT_EXPORT void* RegisterCustomOps(void* /*session_options*/, const void* /*api_base*/) {
  return nullptr;
}
