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

# ggml's AMX kernels (compiled in when -march=native finds AMX) stopped with SIGILL on a 2-core Xeon VM whose
# CPU reports amx_tile/amx_int8: the Q4_K matmul ran `tilezero` with no tile configuration in place (the VM
# does not keep a thread's tile state), so every Q4_K_M answer and judgement killed its process. On a CPU that
# reports AMX the build therefore names the instruction sets itself instead of -march=native: everything the
# CPU reports (AVX-512 included), AMX left out. Elsewhere -march=native stays.
# (JPSLM_CPUINFO names another file in the format of /proc/cpuinfo, for the test of this logic.)
if(NOT DEFINED JPSLM_CPUINFO)
  set(JPSLM_CPUINFO "/proc/cpuinfo")
endif()
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND EXISTS "${JPSLM_CPUINFO}")
  file(STRINGS "${JPSLM_CPUINFO}" _jpslm_flags_line REGEX "^flags" LIMIT_COUNT 1)
  if(_jpslm_flags_line MATCHES " amx_tile")
    set(GGML_NATIVE OFF CACHE BOOL "ggml: -march=native (off: AMX left out)" FORCE)
    string(REGEX REPLACE "^flags[ \t]*:[ \t]*" "" _jpslm_flags "${_jpslm_flags_line}")
    string(REPLACE " " ";" _jpslm_flags "${_jpslm_flags}")
    foreach(_jpslm_pair IN ITEMS "sse4_2:SSE42" "avx:AVX" "avx2:AVX2" "bmi2:BMI2" "fma:FMA" "f16c:F16C"
                                 "avx_vnni:AVX_VNNI" "avx512f:AVX512" "avx512vbmi:AVX512_VBMI"
                                 "avx512_vnni:AVX512_VNNI" "avx512_bf16:AVX512_BF16")
      string(REPLACE ":" ";" _jpslm_pair "${_jpslm_pair}")
      list(GET _jpslm_pair 0 _jpslm_flag)
      list(GET _jpslm_pair 1 _jpslm_option)
      if(_jpslm_flag IN_LIST _jpslm_flags)
        set(GGML_${_jpslm_option} ON CACHE BOOL "" FORCE)
      else()
        set(GGML_${_jpslm_option} OFF CACHE BOOL "" FORCE)
      endif()
    endforeach()
    foreach(_jpslm_option IN ITEMS AMX_TILE AMX_INT8 AMX_BF16)
      set(GGML_${_jpslm_option} OFF CACHE BOOL "" FORCE)
    endforeach()
    message(STATUS "jpslm: AMX reported by this CPU; ggml built for its other instruction sets, without AMX")
  endif()
endif()
