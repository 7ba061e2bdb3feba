# Finds the libtorch that belongs to the active Python's torch, so the op library is built
# against exactly the torch it will be loaded into. Sets PANTHER_TORCH_VERSION and
# PANTHER_TORCH_HAS_CUDA, and decides PANTHER_CUDA (ON/OFF) from the PANTHER_WITH_CUDA switch.
if(NOT Python_EXECUTABLE)
  find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module)
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(torch.version.cuda or '')"
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
if(_n GREATER 2)
  list(GET _panther_torch_info 2 PANTHER_TORCH_CUDA_VERSION)
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

if(PANTHER_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
endif()

find_package(Torch REQUIRED)
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
