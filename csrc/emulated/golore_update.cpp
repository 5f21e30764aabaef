// csrc/cuda/golore_update.cu compiled as host C++ for the SIMT emulation (backend "cuda_emulated").
#include "cuda/emulation.h"
#include "cuda/golore_update.cu"
