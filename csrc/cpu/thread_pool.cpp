#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace kvsnap::cpu {

namespace {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads) {
    for (int i = 1; i < n_threads; ++i) {
      workers_.emplace_back([this] { work(); });
    }
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& w : workers_) {
      w.join();
    }
  }

  int size() const {
    return int(workers_.size()) + 1;
  }

  void run(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(call_mu_, std::try_to_lock);
    if (n <= 1 || workers_.empty() || !busy.owns_lock()) {
      for (int i = 0; i < n; ++i) {
        f(i);
      }
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &f;
      n_ = n;
      next_ = 0;
      pending_ = int(workers_.size());
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::exception_ptr error;
    {
      // Every worker is out of f before it goes out of scope, even when a
      // task threw: only then is the first exception rethrown to the caller.
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return pending_ == 0; });
      job_ = nullptr;
      error = std::exchange(error_, nullptr);
    }
    if (error) {
      std::rethrow_exception(error);
    }
  }

 private:
  // Runs tasks until none is left. A task that throws (on a worker thread an
  // escaping exception would be std::terminate) is caught: the first
  // exception is kept for run() to rethrow and the remaining tasks are skipped.
  void drain() {
    for (int i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) {
      try {
        (*job_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) {
          error_ = std::current_exception();
        }
        next_ = n_;
        return;
      }
    }
  }

  void work() {
    uint64_t seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) {
          return;
        }
      }
      drain();
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) {
        done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int)>* job_ = nullptr;
  std::exception_ptr error_; // the first exception a task threw (guarded by mu_)
  std::atomic<int> next_{0};
  int n_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int configured_threads() {
  if (const char* env = std::getenv("KVSNAP_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) {
      return n;
    }
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool& pool() {
  static ThreadPool p(configured_threads());
  return p;
}

} // namespace

void parallel_for(int n, const std::function<void(int)>& f) {
  pool().run(n, f);
}

int num_threads() {
  return pool().size();
}

} // namespace kvsnap::cpu
