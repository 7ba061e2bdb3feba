# Finds the libtorch that belongs to the active Python's torch, so the op library is built
# against exactly the torch it will be loaded into. Sets PANTHER_TORCH_VERSION and
# PANTHER_TORCH_CUDA_VERSION, decides PANTHER_CUDA (ON/OFF) from the PANTHER_WITH_CUDA switch,
# and, for CUDA builds, the GPU architectures (PANTHER_CUDA_ARCH_LIST, see below).
if(NOT Python_EXECUTABLE)
  find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module)
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(torch.version.cuda or ''); print(' '.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})) if torch.version.cuda else '')"
  OUTPUT_VARIABLE _panther_torch_info
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _panther_torch_rc)
if(NOT _panther_torch_rc EQUAL 0)
  message(FATAL_ERROR
    "Panther: could not import torch with ${Python_EXECUTABLE}. Install torch first "
    "(pip install torch), then build with pip install --no-build-isolation .")
endif()
string(REPLACE "\n" ";" _panther_torch_info "${_panther_torch_info}")
list(GET _panther_torch_info 0 _panther_torch_prefix)
list(GET _panther_torch_info 1 PANTHER_TORCH_VERSION)
list(LENGTH _panther_torch_info _n)
set(PANTHER_TORCH_CUDA_VERSION "")
set(_panther_visible_gpus "")
if(_n GREATER 2)
  list(GET _panther_torch_info 2 PANTHER_TORCH_CUDA_VERSION)
endif()
if(_n GREATER 3)
  list(GET _panther_torch_info 3 _panther_visible_gpus)
endif()
list(APPEND CMAKE_PREFIX_PATH "${_panther_torch_prefix}")

# The CUDA switch: AUTO builds CUDA kernels when torch has CUDA and nvcc is found.
set(PANTHER_WITH_CUDA "AUTO" CACHE STRING "Build CUDA kernels: AUTO, ON or OFF")
set_property(CACHE PANTHER_WITH_CUDA PROPERTY STRINGS AUTO ON OFF)
set(PANTHER_CUDA OFF)
if(PANTHER_WITH_CUDA STREQUAL "ON" OR PANTHER_WITH_CUDA STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(PANTHER_TORCH_CUDA_VERSION STREQUAL "")
    if(PANTHER_WITH_CUDA STREQUAL "ON")
      message(FATAL_ERROR "Panther: PANTHER_WITH_CUDA=ON but torch ${PANTHER_TORCH_VERSION} has no CUDA")
    endif()
  elseif(NOT CMAKE_CUDA_COMPILER)
    if(PANTHER_WITH_CUDA STREQUAL "ON")
      message(FATAL_ERROR "Panther: PANTHER_WITH_CUDA=ON but nvcc was not found")
    endif()
  else()
    set(PANTHER_CUDA ON)
  endif()
endif()

# GPU architectures. torch's CMake config (Caffe2/public/cuda.cmake) turns TORCH_CUDA_ARCH_LIST
# into nvcc -gencode flags and ignores CMAKE_CUDA_ARCHITECTURES, so TORCH_CUDA_ARCH_LIST is the
# knob, as for torch's own extensions: the CMake variable, else the environment variable, e.g.
# TORCH_CUDA_ARCH_LIST="8.0;9.0". Without either: the GPUs visible to torch at configure time,
# or, when none is visible (a build machine), PANTHER_DEFAULT_CUDA_ARCH_LIST: binaries for
# A100 (8.0), RTX 30xx/A10/A40 (8.6), L4/L40/RTX 40xx (8.9) and H100/H200 (9.0a), and PTX of 8.9
# that newer GPUs compile at load time (the PTX of an "a" architecture runs on that GPU only).
# Device code compiled for 8.x uses the portable copy paths (no Hopper-only instructions, see
# cpp/common/mma.cuh); the kernels need 8.0 at least (bf16 mma.sync, ldmatrix, cp.async).
set(PANTHER_DEFAULT_CUDA_ARCH_LIST "8.0;8.6;8.9+PTX;9.0a")
set(PANTHER_CUDA_ARCH_LIST "")
if(PANTHER_CUDA)
  if(DEFINED TORCH_CUDA_ARCH_LIST)
    set(_panther_arch_from "TORCH_CUDA_ARCH_LIST")
  elseif(DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
    set(_panther_arch_from "the environment's TORCH_CUDA_ARCH_LIST")
  elseif(CMAKE_CUDA_ARCHITECTURES)
    # CMake's own knob (80;90) would be ignored by torch's config: translate it (8.0;9.0).
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_a IN LISTS CMAKE_CUDA_ARCHITECTURES)
      string(REGEX REPLACE "^([0-9]+)([0-9])(-real|-virtual)?$" "\\1.\\2" _a "${_a}")
      string(REGEX REPLACE "^([0-9]+)([0-9])a(-real|-virtual)?$" "\\1.\\2a" _a "${_a}")
      list(APPEND TORCH_CUDA_ARCH_LIST "${_a}")
    endforeach()
    set(_panther_arch_from "CMAKE_CUDA_ARCHITECTURES; TORCH_CUDA_ARCH_LIST is the supported knob")
  elseif(NOT _panther_visible_gpus STREQUAL "")
    string(REPLACE " " ";" TORCH_CUDA_ARCH_LIST "${_panther_visible_gpus}")
    set(_panther_arch_from "the visible GPUs")
  else()
    set(TORCH_CUDA_ARCH_LIST "${PANTHER_DEFAULT_CUDA_ARCH_LIST}")
    set(_panther_arch_from "the default (no GPU visible)")
  endif()
  string(REGEX REPLACE "[ \t]+" ";" _panther_archs "${TORCH_CUDA_ARCH_LIST}")
  foreach(_a IN LISTS _panther_archs)
    if(_a MATCHES "^([0-9]+)\\.([0-9]+)" AND CMAKE_MATCH_1 LESS 8)
      message(FATAL_ERROR "Panther: TORCH_CUDA_ARCH_LIST has ${_a}; Panther's CUDA kernels need "
        "compute capability 8.0 or newer (bf16 tensor cores, cp.async)")
    endif()
  endforeach()
  # Space-separated: the value becomes a string compile definition, and a ";" in it would split
  # the definition into two broken compiler arguments.
  string(REPLACE ";" " " PANTHER_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}")
  message(STATUS "Panther: CUDA architectures ${PANTHER_CUDA_ARCH_LIST} (from ${_panther_arch_from})")
  # Architecture flags come from torch's config (CMAKE_CUDA_FLAGS); CMake adds none of its own
  # (OFF), and is unset while torch's config runs, which would otherwise warn that it ignores it.
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  unset(CMAKE_CUDA_ARCHITECTURES)
endif()

find_package(Torch REQUIRED)
if(PANTHER_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES OFF)
endif()
message(STATUS "Panther: torch ${PANTHER_TORCH_VERSION} (CUDA '${PANTHER_TORCH_CUDA_VERSION}'), CUDA kernels: ${PANTHER_CUDA}")

# libtorch_python is not needed: the op library talks to the dispatcher only.
set(PANTHER_TORCH_LIBS torch torch_library c10)
if(TARGET torch_cpu)
  list(APPEND PANTHER_TORCH_LIBS torch_cpu)
endif()
if(PANTHER_CUDA)
  if(TARGET torch_cuda)
    list(APPEND PANTHER_TORCH_LIBS torch_cuda)
  endif()
  if(TARGET c10_cuda)
    list(APPEND PANTHER_TORCH_LIBS c10_cuda)
  endif()
endif()
