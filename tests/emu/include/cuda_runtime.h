// The CUDA emulation stands in for the CUDA headers (tests/emu/emu.h).
#pragma once
#include "../emu.h"
