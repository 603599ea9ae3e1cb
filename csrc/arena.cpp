#include "arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>

#include "errors.h"

namespace kvsnap {

namespace {

std::atomic<bool> g_poison{false};

size_t round_up(size_t n, size_t to) {
  return size_t(kv_round_up(long(n), long(to)));
}

constexpr size_t kArrayAlign = 64;
constexpr size_t kPage = 4096;

} // namespace

void set_poison(bool on) {
  g_poison = on;
}

bool poison() {
  return g_poison;
}

void ArenaGeometry::validate() const {
  auto positive = [](const char* name, int v) {
    if (v <= 0) {
      throw InvalidArgument(name, "must be positive, got " + std::to_string(v));
    }
  };
  positive("n_layers", n_layers);
  positive("n_kv_heads", n_kv_heads);
  positive("head_dim", head_dim);
  positive("block_tokens", block_tokens);
  check_quant_format(v_bits, group_size, head_dim, "head_dim");
  // 6-bit rows fit whole words: group_size (at least 16) divides head_dim.
  if (k_bits != 4 && k_bits != 6 && k_bits != 8) {
    throw InvalidArgument("key_bits", "must be 4, 6 or 8, got " + std::to_string(k_bits));
  }
}

void check_quant_format(int bits, int group_size, int head_dim, const char* head_dim_arg) {
  if (bits != 4 && bits != 8) {
    throw InvalidArgument("bits", "must be 4 or 8, got " + std::to_string(bits));
  }
  if (group_size != 16 && group_size != 32 && group_size != 64 &&
      group_size != 128) {
    throw InvalidArgument(
        "group_size",
        "must be 16, 32, 64 or 128, got " + std::to_string(group_size));
  }
  if (head_dim > 256) {
    throw InvalidArgument(
        head_dim_arg, "head_dim must be at most 256, got " + std::to_string(head_dim));
  }
  if (head_dim % group_size != 0) {
    throw InvalidArgument(
        "group_size",
        std::to_string(group_size) + " does not divide head_dim " +
            std::to_string(head_dim));
  }
}

Budget::Budget(int64_t limit_bytes) : limit_(limit_bytes) {
  if (limit_bytes <= 0) {
    throw InvalidArgument(
        "limit_bytes", "must be positive, got " + std::to_string(limit_bytes));
  }
}

bool Budget::try_charge(int64_t bytes, int64_t* seen) {
  // Compare-exchange, not a lock: arenas charge while holding their own
  // lock, and no lock order between arenas and the budget can then arise.
  int64_t used = used_.load();
  while (used + bytes <= limit_) {
    if (used_.compare_exchange_weak(used, used + bytes)) {
      return true;
    }
  }
  if (seen) {
    *seen = used;
  }
  return false;
}

void Budget::release(int64_t bytes) {
  used_.fetch_sub(bytes);
}

namespace {

#ifdef __linux__
// The first number in a file (a cgroup limit or usage), or -1.
int64_t read_number(const std::string& path) {
  std::ifstream in(path);
  int64_t v = -1;
  return in >> v ? v : -1;
}

// "MemAvailable: 123 kB" and "SwapFree:" of /proc/meminfo, in bytes.
int64_t meminfo_available() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kb = 0, total = 0;
  while (in >> key >> kb) {
    std::getline(in, unit);
    if (key == "MemAvailable:" || key == "SwapFree:") {
      total += kb * 1024;
    }
  }
  return total > 0 ? total : -1;
}

// Room left in this process's memory cgroup (v1 or v2), or -1 if unlimited.
int64_t cgroup_room() {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    const auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) {
      continue;
    }
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    std::string limit, usage;
    if (controllers == "memory") {
      limit = "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes";
      usage = "/sys/fs/cgroup/memory" + path + "/memory.usage_in_bytes";
    } else if (controllers.empty()) {
      limit = "/sys/fs/cgroup" + path + "/memory.max"; // "max" reads as -1
      usage = "/sys/fs/cgroup" + path + "/memory.current";
    } else {
      continue;
    }
    const int64_t l = read_number(limit), u = read_number(usage);
    if (l > 0 && u >= 0 && l < (int64_t(1) << 60)) {
      return std::max<int64_t>(0, l - u);
    }
  }
  return -1;
}
#endif

// Memory this process can still get: available RAM and free swap, within
// its memory cgroup's limit; -1 when unknown (not Linux).
int64_t usable_memory() {
#ifdef __linux__
  int64_t room = meminfo_available();
  const int64_t cg = cgroup_room();
  if (cg >= 0 && (room < 0 || cg < room)) {
    room = cg;
  }
  return room;
#else
  return -1;
#endif
}

} // namespace

Arena::Arena(
    const ArenaGeometry& geometry,
    std::optional<int64_t> budget_bytes,
    std::shared_ptr<Budget> budget)
    : geo_(geometry), budget_(std::move(budget)), shared_budget_(budget_ != nullptr) {
  geo_.validate();
  if (!budget_bytes && !budget_) {
    throw InvalidArgument(
        "budget_bytes", "give budget_bytes, or budget= a kvsnap.Budget shared by arenas");
  }
  size_t sizes[6];
  for (int i = 0; i < 6; ++i) {
    sizes[i] = array_bytes(i);
  }
  // Array-major: each of the six arrays holds every layer back to back, so a
  // slot is six contiguous [n_layers, n_kv_heads, block_tokens, ...] arrays
  // (one read and one checksum each when a block is loaded from disk).
  size_t off = 0;
  layers_.resize(geo_.n_layers);
  for (int i = 0; i < 6; ++i) {
    for (auto& layer : layers_) {
      layer.off[i] = off;
      off += sizes[i];
    }
    off = round_up(off, kArrayAlign);
  }
  slot_bytes_ = round_up(off, kPage);
  // budget_bytes caps this arena; a shared budget alone caps it at its limit
  // (the mapping reserves no memory, so sizing it for the whole budget is free).
  const int64_t cap = budget_bytes ? *budget_bytes : budget_->limit();
  if (cap < int64_t(slot_bytes_)) {
    throw InvalidArgument(
        budget_bytes ? "budget_bytes" : "budget",
        std::to_string(cap) + " bytes is less than one slot (" +
            std::to_string(slot_bytes_) + " bytes for this geometry)");
  }
  // The mapping below reserves no memory (MAP_NORESERVE), so a budget the
  // machine cannot back would only fail later, as the OOM killer at some
  // kernel's write. Refuse it here, while the error can still say why.
  // With a shared budget, what its other arenas hold is already in memory:
  // only the rest of it must fit.
  const int64_t need = budget_ ? std::min(cap, budget_->limit() - budget_->used()) : cap;
  if (const int64_t room = usable_memory(); room >= 0 && need > room) {
    throw InvalidArgument(
        budget_bytes ? "budget_bytes" : "budget",
        std::to_string(need) + " bytes of budget is more memory than this process can get (" +
            std::to_string(room) +
            " bytes: available RAM and free swap, within its memory cgroup's limit); lower the budget "
            "or free memory");
  }
  if (!budget_) {
    budget_ = std::make_shared<Budget>(*budget_bytes);
  }
  n_slots_ = cap / int64_t(slot_bytes_);
  // Whole pages of this system: a Metal buffer can only wrap those.
  map_bytes_ = round_up(size_t(n_slots_) * slot_bytes_, size_t(sysconf(_SC_PAGESIZE)));
  void* p = mmap(
      nullptr,
      map_bytes_,
      PROT_READ | PROT_WRITE,
      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
      -1,
      0);
  if (p == MAP_FAILED) {
    throw ArenaFull(
        "could not map " + std::to_string(map_bytes_) +
        " bytes for the arena: " + std::strerror(errno));
  }
  base_ = static_cast<uint8_t*>(p);
  refcount_.assign(n_slots_, 0);
  pins_.assign(n_slots_, 0);
  free_list_.reserve(n_slots_);
  // Lowest slot on top of the stack: allocation order is predictable.
  for (int64_t s = n_slots_ - 1; s >= 0; --s) {
    free_list_.push_back(s);
  }
}

Arena::~Arena() {
  // Slots still held go with the arena: a shared budget gets their bytes back.
  budget_->release(used_ * int64_t(slot_bytes_));
  device_view_.reset(); // a GPU buffer over the mapping goes before the mapping
  if (base_) {
    munmap(base_, map_bytes_);
  }
}

size_t Arena::array_bytes(int which) const {
  const ArenaGeometry& g = geo_;
  if (which == 0 || which == 3) {
    return size_t(kv_packed_bytes(
        g.n_kv_heads, g.block_tokens, g.head_dim, which == 0 ? g.k_bits : g.v_bits));
  }
  return size_t(kv_meta_bytes(g.n_kv_heads, g.block_tokens, g.head_dim, g.group_size));
}

std::shared_ptr<void> Arena::device_view(
    const std::function<std::shared_ptr<void>(uint8_t*, size_t)>& make) const {
  std::lock_guard<std::mutex> lock(view_mu_);
  if (!device_view_) {
    device_view_ = make(base_, map_bytes_);
  }
  return device_view_;
}

void Arena::check_range(int64_t slot, const char* what) const {
  if (slot < 0 || slot >= n_slots_) {
    throw SlotError(
        std::string(what) + ": slot " + std::to_string(slot) +
        " is out of range (arena has " + std::to_string(n_slots_) + " slots)");
  }
}

void Arena::check_live(int64_t slot, const char* what) const {
  check_range(slot, what);
  std::lock_guard<std::mutex> lock(mu_);
  if (refcount_[slot] == 0) {
    throw SlotError(
        std::string(what) + ": slot " + std::to_string(slot) +
        " is not allocated (used after free?)");
  }
}

std::string Arena::full_message(bool budget_spent, int64_t seen) const {
  if (budget_spent) {
    return "budget of " + std::to_string(budget_->limit()) + " bytes is spent: " +
        std::to_string(seen) + " in use, a slot needs " + std::to_string(slot_bytes_) +
        "; free blocks or raise the budget";
  }
  std::string msg = "arena is full: all " + std::to_string(n_slots_) + " slots of " +
      std::to_string(slot_bytes_) + " bytes are in use";
  if (pinned_free_ > 0) {
    msg += " (" + std::to_string(pinned_free_) +
        " freed but held by pending kvsnap ops until they are evaluated)";
  }
  return msg + "; free blocks or create a larger arena";
}

int64_t Arena::alloc() {
  int64_t slot;
  {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t seen = budget_->used();
    if (free_list_.empty()) {
      // A mapping sized by a shared budget runs out when the budget does:
      // say so, unless budget_bytes capped this arena below it.
      const bool spent = shared_budget_ && seen + int64_t(slot_bytes_) > budget_->limit();
      throw ArenaFull(full_message(spent, seen));
    }
    // A private budget fits every slot of the mapping; only a shared one
    // can be spent while this arena still has free slots.
    if (!budget_->try_charge(int64_t(slot_bytes_), &seen)) {
      throw ArenaFull(full_message(true, seen));
    }
    slot = free_list_.back();
    free_list_.pop_back();
    refcount_[slot] = 1;
    ++used_;
  }
  if (poison()) {
    std::memset(slot_ptr(slot), 0xFF, slot_bytes_);
  }
  return slot;
}

void Arena::free_slot_locked(int64_t slot) {
  // The pages go back to the OS before anyone can take the slot again (a
  // later alloc's writes must not race the madvise). Advice only: on
  // failure the pages just stay resident.
#ifdef __APPLE__
  madvise(slot_ptr(slot), slot_bytes_, MADV_FREE);
#else
  madvise(slot_ptr(slot), slot_bytes_, MADV_DONTNEED);
#endif
  free_list_.push_back(slot); // never reallocates (reserved for every slot): unpin cannot throw
  --used_;
  budget_->release(int64_t(slot_bytes_));
}

int64_t Arena::incref(int64_t slot) {
  check_range(slot, "incref");
  std::lock_guard<std::mutex> lock(mu_);
  if (refcount_[slot] == 0) {
    throw SlotError(
        "incref: slot " + std::to_string(slot) +
        " is free; it must be allocated before it can be shared");
  }
  if (++refcount_[slot] == 2) {
    ++shared_;
  }
  return refcount_[slot];
}

int64_t Arena::decref(int64_t slot) {
  check_range(slot, "decref");
  std::lock_guard<std::mutex> lock(mu_);
  if (refcount_[slot] == 0) {
    throw SlotError(
        "decref: slot " + std::to_string(slot) +
        " is already free (double free)");
  }
  int32_t rc = --refcount_[slot];
  if (rc == 1) {
    --shared_;
  } else if (rc == 0) {
    if (pins_[slot] == 0) {
      free_slot_locked(slot);
    } else {
      ++pinned_free_; // freed by its last unpin
    }
  }
  return rc;
}

void Arena::pin(int64_t slot) {
  check_range(slot, "pin");
  std::lock_guard<std::mutex> lock(mu_);
  if (refcount_[slot] == 0) {
    throw SlotError(
        "pin: slot " + std::to_string(slot) + " is not allocated (used after free?)");
  }
  ++pins_[slot];
}

void Arena::unpin(int64_t slot) noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  if (--pins_[slot] == 0 && refcount_[slot] == 0) {
    --pinned_free_;
    free_slot_locked(slot);
  }
}

int64_t Arena::pins(int64_t slot) const {
  check_range(slot, "pins");
  std::lock_guard<std::mutex> lock(mu_);
  return pins_[slot];
}

int64_t Arena::refcount(int64_t slot) const {
  check_range(slot, "refcount");
  std::lock_guard<std::mutex> lock(mu_);
  return refcount_[slot];
}

ArenaStats Arena::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  ArenaStats s;
  s.slots_total = n_slots_;
  s.slots_used = used_;
  s.slots_shared = shared_;
  s.slots_pinned_free = pinned_free_;
  s.slot_bytes = int64_t(slot_bytes_);
  s.bytes_total = n_slots_ * int64_t(slot_bytes_);
  s.bytes_used = used_ * int64_t(slot_bytes_);
  return s;
}

SlotPins::SlotPins(std::shared_ptr<Arena> arena, std::vector<int64_t> slots)
    : arena_(std::move(arena)) {
  std::sort(slots.begin(), slots.end());
  slots.erase(std::unique(slots.begin(), slots.end()), slots.end());
  for (int64_t slot : slots) {
    try {
      arena_->pin(slot);
    } catch (...) {
      for (int64_t pinned : slots_) {
        arena_->unpin(pinned);
      }
      throw;
    }
    slots_.push_back(slot);
  }
}

SlotPins::~SlotPins() {
  for (int64_t slot : slots_) {
    arena_->unpin(slot);
  }
}

std::string shared_slot_message(int64_t slot, int64_t refcount) {
  return "slot " + std::to_string(slot) + " is shared by " + std::to_string(refcount) +
      " holders; kvsnap never writes into a shared block (copy it first)";
}

} // namespace kvsnap
