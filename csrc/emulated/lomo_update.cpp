// csrc/cuda/lomo_update.cu compiled as host C++ for the SIMT emulation (backend "cuda_emulated").
#include "cuda/emulation.h"
#include "cuda/lomo_update.cu"
