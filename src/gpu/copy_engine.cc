#include "usvm/gpu/copy_engine.h"

#include <algorithm>
#include <cstring>

namespace usvm::gpu {

namespace {
constexpr size_t kMaxPages = size_t{1} << 20;
}

CopyEngine::CopyEngine(uint32_t gpu_id, uint32_t index, Resolver resolve, const LatencyModel& latency,
                       Env& env)
    : gpu_id_(gpu_id), index_(index), resolve_(std::move(resolve)), latency_(latency), env_(env) {
  thread_ = std::thread([this] { Run(); });
}

CopyEngine::~CopyEngine() {
  {
    MutexLock l(lock_);
    stop_ = true;
  }
  stopping_.store(true, std::memory_order_release);
  work_.WakeAll();
  thread_.join();
}

Result<Fence> CopyEngine::Copy(std::span<const PhysAddr> src, std::span<const PhysAddr> dst) {
  if (src.empty() || src.size() != dst.size()) return Err(Errc::kInval, "page lists empty or unequal");
  if (src.size() > kMaxPages) return Err(Errc::kInval, "too many pages in one copy");
  Job job;
  job.src.reserve(src.size());
  job.dst.reserve(dst.size());
  uint64_t link_bytes = 0, local_bytes = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    if ((src[i].addr | dst[i].addr) & (kPageSize - 1)) return Err(Errc::kInval, "page not 4 KiB aligned");
    job.src.push_back(USVM_TRY(resolve_(src[i], kPageSize)));
    job.dst.push_back(USVM_TRY(resolve_(dst[i], kPageSize)));
    const bool src_local = src[i].kind == MemKind::kVram && src[i].gpu == gpu_id_;
    const bool dst_local = dst[i].kind == MemKind::kVram && dst[i].gpu == gpu_id_;
    (src_local && dst_local ? local_bytes : link_bytes) += kPageSize;
  }
  return Queue(std::move(job), link_bytes, local_bytes);
}

namespace {
// What a null host page reads as.
alignas(4096) const std::byte kZeroPage[kPageSize] = {};
}  // namespace

Result<Fence> CopyEngine::CopyHost(HostDir dir, std::span<std::byte* const> host,
                                   std::span<const PhysAddr> dev) {
  if (host.empty() || host.size() != dev.size()) return Err(Errc::kInval, "page lists empty or unequal");
  if (host.size() > kMaxPages) return Err(Errc::kInval, "too many pages in one copy");
  Job job;
  job.src.reserve(host.size());
  job.dst.reserve(host.size());
  for (size_t i = 0; i < host.size(); ++i) {
    if (dev[i].addr & (kPageSize - 1)) return Err(Errc::kInval, "page not 4 KiB aligned");
    std::byte* d = USVM_TRY(resolve_(dev[i], kPageSize));
    if (dir == HostDir::kToDevice) {
      job.src.push_back(host[i] ? host[i] : const_cast<std::byte*>(kZeroPage));
      job.dst.push_back(d);
    } else {
      if (!host[i]) return Err(Errc::kInval, "null host page");
      job.src.push_back(d);
      job.dst.push_back(host[i]);
    }
  }
  return Queue(std::move(job), host.size() * kPageSize, 0);
}

Result<Fence> CopyEngine::Queue(Job job, uint64_t link_bytes, uint64_t local_bytes) {
  MutexLock l(lock_);
  if (stop_) return Err(Errc::kCanceled, "copy engine stopped");
  uint64_t ns = 0;
  if (link_bytes)
    ns += LatencyModel::TransferNs(link_bytes, latency_.link_bandwidth_bytes_per_s, latency_.link_latency_ns);
  if (local_bytes) ns += LatencyModel::TransferNs(local_bytes, latency_.vram_bandwidth_bytes_per_s, 0);
  busy_until_ns_ = std::max(busy_until_ns_, env_.NowNs()) + ns;
  job.fence = Fence::CreatePending(env_, busy_until_ns_);
  Fence f = job.fence;
  queue_.push_back(std::move(job));
  queued_.fetch_add(1, std::memory_order_release);
  work_.WakeAll();
  return f;
}

void CopyEngine::Run() {
  for (;;) {
    work_.Wait([this] {
      return queued_.load(std::memory_order_acquire) != 0 || stopping_.load(std::memory_order_acquire);
    });
    Job job;
    {
      MutexLock l(lock_);
      if (queue_.empty()) {
        if (stop_) return;
        continue;
      }
      job = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_release);
    }
    const bool fail = env_.ShouldFail("gpu.copy");
    if (!fail)
      for (size_t i = 0; i < job.src.size(); ++i) std::memmove(job.dst[i], job.src[i], kPageSize);
    {
      MutexLock l(lock_);
      ++stats_.copies;
      if (fail) {
        ++stats_.failures;
      } else {
        stats_.pages += job.src.size();
        stats_.bytes += job.src.size() * kPageSize;
      }
    }
    job.fence.Signal(fail ? Result<void>(Err(Errc::kIo, "injected copy failure")) : Result<void>());
  }
}

CopyStats CopyEngine::Stats() const {
  MutexLock l(lock_);
  return stats_;
}

}  // namespace usvm::gpu
