// Error text for the host side: the Rust runtime turns cudaError_t codes into messages.
#include "braidinfer.h"

extern "C" const char *bi_error_string(cudaError_t error) { return cudaGetErrorString(error); }
