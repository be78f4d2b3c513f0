# A CMake include for building llama-cpp-python from source with only what its Python bindings load
# (libllama and libggml*), passed through CMAKE_ARGS by the README's install command:
#
#   CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$PWD/jpslm_assets/data/llama_cpp_lean.cmake"
#
# CMake runs it at the end of llama.cpp's own project() call. llama-cpp-python forces llama.cpp's `common`
# library on (a FORCEd cache entry, which -D cannot override), although nothing in the bindings links it;
# a normal variable in llama.cpp's directory scope shadows that cache entry, so neither `common` nor the
# HTTP library it pulls in is compiled. LLAVA_BUILD=OFF leaves out libmtmd, which llama-cpp-python loads
# only for its vision chat handlers. Conversion (convert_hf_to_gguf.py, from the sdist), quantization
# (llama_model_quantize in libllama) and inference are untouched. docs/benchmarks/training.md has the times.
set(LLAMA_BUILD_COMMON OFF)
