// How many instructions of a class this x86-64 CPU completes per
// nanosecond, on one thread and on N at once: the ceilings that
// kernel_bound.py holds the attention kernel's instruction counts against.
// Each loop is straight-line assembly of independent instructions (no
// instruction waits for another), so it runs at the throughput of the
// units that execute it; the clock loop is one dependent chain of integer
// adds (one cycle each on every x86-64 core), so it runs at the clock.
//
// Build: c++ -O2 -std=c++17 -pthread pipes.cpp (the assembler takes AVX2
// instructions without -mavx2; the program runs them only where the CPU has
// them, which kernel_bound.py checks first). Output: one JSON object.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

// Instructions per loop iteration in every loop below: .rept 10 of 12
// (TWELVE or 12 loads/stores), or .rept 60 of 2 adds for the clock.
constexpr int kPerIter = 120;

#define TWELVE(OP, SRC)                                                                              \
  OP " " SRC ",%%ymm0,%%ymm2\n" OP " " SRC ",%%ymm0,%%ymm3\n" OP " " SRC ",%%ymm0,%%ymm4\n" OP " " SRC \
     ",%%ymm0,%%ymm5\n" OP " " SRC ",%%ymm0,%%ymm6\n" OP " " SRC ",%%ymm0,%%ymm7\n" OP " " SRC          \
     ",%%ymm0,%%ymm8\n" OP " " SRC ",%%ymm0,%%ymm9\n" OP " " SRC ",%%ymm0,%%ymm10\n" OP " " SRC         \
     ",%%ymm0,%%ymm11\n" OP " " SRC ",%%ymm0,%%ymm12\n" OP " " SRC ",%%ymm0,%%ymm13\n"

#define CLOBBERS                                                                                          \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", \
      "xmm13", "cc", "memory"

alignas(64) unsigned char g_buffer[64][4096];

// A loop of the register-to-register instruction OP, 12 independent ones
// (from ymm1 and ymm0 into ymm2 .. ymm13) 10 times per iteration.
#define REGISTER_LOOP(NAME, OP)                                                           \
  void NAME(long iters, unsigned char*) {                                                 \
    asm volatile("vpxor %%xmm0,%%xmm0,%%xmm0\n vpxor %%xmm1,%%xmm1,%%xmm1\n"              \
                 "1:\n .rept 10\n" TWELVE(OP, "%%ymm1") ".endr\n dec %0\n jnz 1b\n"        \
                 : "+r"(iters)                                                            \
                 :                                                                        \
                 : CLOBBERS);                                                             \
  }

// vpmaddubsw: the integer multiply of the avx2-int kernel.
REGISTER_LOOP(multiply, "vpmaddubsw")
// vpaddw: an integer vector operation that every vector unit executes.
REGISTER_LOOP(vector_alu, "vpaddw")

// 32-byte loads from a buffer in the L1 cache.
void load(long iters, unsigned char* p) {
  asm volatile(
      "1:\n .rept 10\n"
      "vmovdqa 0(%1),%%ymm2\n vmovdqa 32(%1),%%ymm3\n vmovdqa 64(%1),%%ymm4\n vmovdqa 96(%1),%%ymm5\n"
      "vmovdqa 128(%1),%%ymm6\n vmovdqa 160(%1),%%ymm7\n vmovdqa 192(%1),%%ymm8\n vmovdqa 224(%1),%%ymm9\n"
      "vmovdqa 256(%1),%%ymm10\n vmovdqa 288(%1),%%ymm11\n vmovdqa 320(%1),%%ymm12\n vmovdqa 352(%1),%%ymm13\n"
      ".endr\n dec %0\n jnz 1b\n"
      : "+r"(iters)
      : "r"(p)
      : CLOBBERS);
}

// 32-byte stores to a buffer in the L1 cache.
void store(long iters, unsigned char* p) {
  asm volatile(
      "vpxor %%xmm2,%%xmm2,%%xmm2\n"
      "1:\n .rept 10\n"
      "vmovdqa %%ymm2,0(%1)\n vmovdqa %%ymm2,32(%1)\n vmovdqa %%ymm2,64(%1)\n vmovdqa %%ymm2,96(%1)\n"
      "vmovdqa %%ymm2,128(%1)\n vmovdqa %%ymm2,160(%1)\n vmovdqa %%ymm2,192(%1)\n vmovdqa %%ymm2,224(%1)\n"
      "vmovdqa %%ymm2,256(%1)\n vmovdqa %%ymm2,288(%1)\n vmovdqa %%ymm2,320(%1)\n vmovdqa %%ymm2,352(%1)\n"
      ".endr\n dec %0\n jnz 1b\n"
      : "+r"(iters)
      : "r"(p)
      : CLOBBERS);
}

// One dependent chain of register adds: one per cycle.
void clock_chain(long iters, unsigned char*) {
  long a = 1, b = 2;
  asm volatile(
      "1:\n .rept 60\n add %1,%2\n add %2,%1\n .endr\n dec %0\n jnz 1b\n"
      : "+r"(iters), "+r"(a), "+r"(b)
      :
      : "cc");
}

using Loop = void (*)(long, unsigned char*);

// Instructions per nanosecond of `loop` on `threads` threads started
// together (best of `repeats`).
double rate(Loop loop, int threads, long iters, int repeats) {
  double best = 0;
  for (int rep = 0; rep < repeats; ++rep) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        ready.fetch_add(1);
        while (!go.load()) {
        }
        loop(iters, g_buffer[t]);
      });
    }
    while (ready.load() < threads) {
    }
    auto start = std::chrono::steady_clock::now();
    go.store(true);
    for (auto& th : pool) {
      th.join();
    }
    double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(threads) * iters * kPerIter / ns);
  }
  return best;
}

} // namespace

int main(int argc, char** argv) {
  long iters = argc > 1 ? std::atol(argv[1]) : 2000000;
  int repeats = argc > 2 ? std::atoi(argv[2]) : 5;
  int threads = argc > 3 ? std::atoi(argv[3]) : 2;
  if (iters < 1 || repeats < 1 || threads < 1 || threads > 64) {
    std::fprintf(stderr, "usage: pipes [iterations [repeats [threads (1..64)]]]\n");
    return 2;
  }
  struct {
    const char* name;
    Loop loop;
  } loops[] = {{"clock", clock_chain}, {"multiply", multiply}, {"vector_alu", vector_alu}, {"load", load}, {"store", store}};
  std::printf("{");
  for (size_t i = 0; i < sizeof loops / sizeof loops[0]; ++i) {
    double one = rate(loops[i].loop, 1, iters, repeats);
    double all = rate(loops[i].loop, threads, iters, repeats);
    std::printf("%s\"%s\": {\"1\": %.4f, \"all\": %.4f}", i ? ", " : "", loops[i].name, one, all);
  }
  std::printf("}\n");
  return 0;
}
