// csrc/cuda/grad_accumulate.cu compiled as host C++ for the SIMT emulation (backend "cuda_emulated").
#include "cuda/emulation.h"
#include "cuda/grad_accumulate.cu"
