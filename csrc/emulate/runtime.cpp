// The CUDA runtime calls the row launchers make, for the CPU emulation (emu.h): no errors, a small made-up GPU
// (emu::sms SMs, emu::occupancy resident blocks per SM).
#include "emu.h"

extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::sms;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = emu::occupancy;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t, unsigned) {
  *blocks = emu::occupancy;
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t) { return "an emulated CUDA error"; }
}

extern "C" cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
