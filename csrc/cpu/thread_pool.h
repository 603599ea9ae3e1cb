// A small persistent thread pool for the CPU kernels. The calling thread
// takes part in the work. A call made while another is running (two MLX
// streams at once) runs serially on its own thread rather than waiting.
#pragma once

#include <functional>

namespace kvsnap::cpu {

// Runs f(0) ... f(n - 1), spread over the pool; returns when all are done.
// If a task throws, the tasks not yet started are skipped and the first
// exception is rethrown on the calling thread once every worker is out of f.
void parallel_for(int n, const std::function<void(int)>& f);

// Threads used by parallel_for, the caller included (KVSNAP_NUM_THREADS
// overrides the hardware count).
int num_threads();

} // namespace kvsnap::cpu
