// hmm_range_fault semantics (mm/hmm.c) through AddressSpace::RangeFault.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "test_util.h"
#include "usvm/mm/hmm.h"
#include "usvm/mm/mmu_interval_notifier.h"

namespace usvm::mm {
namespace {

// A minimal mirror: publishes cur_seq under its lock, counts callbacks.
class SeqOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    MutexLock l(lock);
    sub->SetSeq(cur_seq);
    ++calls;
    return true;
  }
  Mutex lock;
  int calls USVM_GUARDED_BY(lock) = 0;
};

class HmmRangeFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(256);
    as_ = testing::MakeSpace(*pool_);
  }
  void TearDown() override {
    if (sub_.hub()) {
      ASSERT_TRUE(sub_.Remove().has_value());
    }
  }
  void Watch(uint64_t start, uint64_t len) {
    ASSERT_TRUE(as_->notifiers().Insert(&sub_, start, len, &ops_).has_value());
  }
  // One RangeFault call over [start, start + n pages) with fresh words.
  Result<void> Fault(uint64_t start, uint64_t n, uint64_t default_flags,
                     std::vector<uint64_t>* out, uint64_t mask = 0) {
    // Faulting can itself invalidate (a COW break sends CLEAR): EBUSY then
    // means "start again", as in every hmm_range_fault caller.
    out->resize(n);
    for (int tries = 0;; ++tries) {
      HmmRange r;
      r.notifier = &sub_;
      r.notifier_seq = sub_.ReadBegin();
      r.start = start;
      r.end = start + n * kPageSize;
      r.hmm_pfns = out->data();
      r.default_flags = default_flags;
      r.pfn_flags_mask = mask;
      ReadLock l(as_->mmap_lock());
      auto res = as_->RangeFault(r);
      if (res || res.error() != Errc::kBusy || tries == 10) return res;
    }
  }
  uint64_t MapAnon(uint64_t len, uint32_t prot = kProtRead | kProtWrite) {
    return *as_->Mmap(0, len, prot, kMapPrivate | kMapAnonymous);
  }

  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
  MmuIntervalNotifier sub_;
  SeqOps ops_;
};

TEST_F(HmmRangeFaultTest, SnapshotReportsAbsentPagesAsZeroAndPresentOnesWithTheirFrame) {
  uint64_t a = MapAnon(4 * kPageSize);
  Watch(a, 4 * kPageSize);
  uint8_t v = 1;
  ASSERT_TRUE(as_->Write(a + kPageSize, &v, 1).has_value());
  std::vector<uint64_t> w;
  ASSERT_TRUE(Fault(a, 4, 0, &w).has_value());
  EXPECT_EQ(w[0], 0u);
  EXPECT_EQ(w[1], kPfnValid | kPfnWrite | as_->QueryPte(a + kPageSize).pfn);
  EXPECT_EQ(w[2], 0u);
  EXPECT_EQ(as_->QueryPte(a).kind, PteInfo::Kind::kNone);  // a snapshot faults nothing
}

TEST_F(HmmRangeFaultTest, ReadFaultMapsTheZeroPageReadOnly) {
  uint64_t a = MapAnon(2 * kPageSize);
  Watch(a, 2 * kPageSize);
  std::vector<uint64_t> w;
  ASSERT_TRUE(Fault(a, 2, kPfnReqFault, &w).has_value());
  for (uint64_t x : w) {
    EXPECT_EQ(x & kPfnFlags, kPfnValid);
    EXPECT_EQ(HmmPfn(x), FramePool::kZeroPfn);
  }
}

TEST_F(HmmRangeFaultTest, WriteFaultAllocatesWritablePages) {
  uint64_t a = MapAnon(2 * kPageSize);
  Watch(a, 2 * kPageSize);
  std::vector<uint64_t> w;
  ASSERT_TRUE(Fault(a, 2, kPfnReqFault | kPfnReqWrite, &w).has_value());
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(w[i] & kPfnFlags, kPfnValid | kPfnWrite);
    EXPECT_EQ(HmmPfn(w[i]), as_->QueryPte(a + i * kPageSize).pfn);
    EXPECT_NE(HmmPfn(w[i]), FramePool::kZeroPfn);
  }
}

TEST_F(HmmRangeFaultTest, HolesAreErrorsInSnapshotsAndEfaultWhenFaulting) {
  uint64_t a = MapAnon(3 * kPageSize);
  ASSERT_TRUE(as_->Munmap(a + kPageSize, kPageSize).has_value());
  Watch(a, 3 * kPageSize);
  std::vector<uint64_t> w;
  ASSERT_TRUE(Fault(a, 3, 0, &w).has_value());
  EXPECT_EQ(w[1], kPfnError);
  EXPECT_EQ(Fault(a, 3, kPfnReqFault, &w).error(), Errc::kFault);
}

TEST_F(HmmRangeFaultTest, ProtNoneIsErrorOrEfault) {
  uint64_t a = MapAnon(kPageSize, kProtNone);
  Watch(a, kPageSize);
  std::vector<uint64_t> w;
  ASSERT_TRUE(Fault(a, 1, 0, &w).has_value());
  EXPECT_EQ(w[0], kPfnError);
  EXPECT_EQ(Fault(a, 1, kPfnReqFault, &w).error(), Errc::kFault);
}

TEST_F(HmmRangeFaultTest, WriteToReadOnlyIsEpermUntilMprotect) {
  uint64_t a = MapAnon(kPageSize, kProtRead);
  Watch(a, kPageSize);
  std::vector<uint64_t> w;
  EXPECT_EQ(Fault(a, 1, kPfnReqFault | kPfnReqWrite, &w).error(), Errc::kPerm);
  ASSERT_TRUE(Fault(a, 1, kPfnReqFault, &w).has_value());
  EXPECT_EQ(w[0] & kPfnFlags, kPfnValid);
  ASSERT_TRUE(as_->Mprotect(a, kPageSize, kProtRead | kProtWrite).has_value());
  ASSERT_TRUE(Fault(a, 1, kPfnReqFault | kPfnReqWrite, &w).has_value());
  EXPECT_EQ(w[0] & kPfnFlags, kPfnValid | kPfnWrite);
}

TEST_F(HmmRangeFaultTest, HugeMappingsReportOrderNineOnEveryEntry) {
  auto r = as_->Mmap(0, 2 * kHugePageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  const uint64_t base = (*r + kHugePageSize - 1) & kHugeMask;
  ASSERT_TRUE(as_->Madvise(*r, 2 * kHugePageSize, kMadvHugePage).has_value());
  Watch(base, kHugePageSize);
  std::vector<uint64_t> w;
  ASSERT_TRUE(Fault(base, kPagesPerHuge, kPfnReqFault | kPfnReqWrite, &w).has_value());
  const Pfn first = HmmPfn(w[0]);
  for (uint64_t i = 0; i < kPagesPerHuge; ++i) {
    ASSERT_EQ(HmmOrder(w[i]), 9u);
    ASSERT_EQ(HmmPfn(w[i]), first + i);
  }
  EXPECT_EQ(first % kPagesPerHuge, 0u);
}

TEST_F(HmmRangeFaultTest, PerPageRequestsThroughTheMask) {
  uint64_t a = MapAnon(4 * kPageSize);
  Watch(a, 4 * kPageSize);
  std::vector<uint64_t> w = {0, kPfnReqFault, 0, kPfnReqFault | kPfnReqWrite};
  HmmRange r;
  r.notifier = &sub_;
  r.notifier_seq = sub_.ReadBegin();
  r.start = a;
  r.end = a + 4 * kPageSize;
  r.hmm_pfns = w.data();
  r.pfn_flags_mask = kPfnReqFault | kPfnReqWrite;
  {
    ReadLock l(as_->mmap_lock());
    ASSERT_TRUE(as_->RangeFault(r).has_value());
  }
  EXPECT_EQ(w[0], 0u);
  EXPECT_EQ(w[1] & kPfnFlags, kPfnValid);
  EXPECT_EQ(w[2], 0u);
  EXPECT_EQ(w[3] & kPfnFlags, kPfnValid | kPfnWrite);
}

TEST_F(HmmRangeFaultTest, InvalidationSinceReadBeginIsEbusy) {
  uint64_t a = MapAnon(2 * kPageSize);
  Watch(a, 2 * kPageSize);
  std::vector<uint64_t> w(2);
  HmmRange r;
  r.notifier = &sub_;
  r.notifier_seq = sub_.ReadBegin();
  r.start = a;
  r.end = a + 2 * kPageSize;
  r.hmm_pfns = w.data();
  r.default_flags = kPfnReqFault;
  ASSERT_TRUE(as_->Mprotect(a, kPageSize, kProtRead).has_value());  // invalidates
  ReadLock l(as_->mmap_lock());
  EXPECT_EQ(as_->RangeFault(r).error(), Errc::kBusy);
}

TEST_F(HmmRangeFaultTest, BeyondEndOfFileIsEfault) {
  auto f = *SimFile::TryCreate(*pool_, kPageSize);
  auto r = as_->Mmap(0, 2 * kPageSize, kProtRead, kMapShared, f, 0);
  Watch(*r, 2 * kPageSize);
  std::vector<uint64_t> w;
  ASSERT_TRUE(Fault(*r, 1, kPfnReqFault, &w).has_value());
  EXPECT_EQ(Fault(*r, 2, kPfnReqFault, &w).error(), Errc::kFault);
}

TEST_F(HmmRangeFaultTest, MalformedRangesAreEinval) {
  uint64_t a = MapAnon(2 * kPageSize);
  Watch(a, kPageSize);
  std::vector<uint64_t> w;
  EXPECT_EQ(Fault(a + 1, 1, 0, &w).error(), Errc::kInval);
  EXPECT_EQ(Fault(a, 2, 0, &w).error(), Errc::kInval);  // beyond the notifier
  EXPECT_EQ(Fault(a, 0, 0, &w).error(), Errc::kInval);
}

TEST_F(HmmRangeFaultTest, CallerLoopCommitsAgainstConcurrentInvalidations) {
  uint64_t a = MapAnon(16 * kPageSize);
  Watch(a, 16 * kPageSize);
  std::atomic<bool> stop{false};
  std::thread churn([&] {
    while (!stop) {
      (void)as_->Mprotect(a, 8 * kPageSize, kProtRead | kProtWrite | kProtExec);
      (void)as_->Mprotect(a, 8 * kPageSize, kProtRead | kProtWrite);
      (void)as_->Madvise(a + 8 * kPageSize, kPageSize, kMadvDontNeed);
    }
  });
  std::vector<uint64_t> w(16);
  int committed = 0;
  for (int round = 0; round < 200; ++round) {
    HmmRange r;
    r.notifier = &sub_;
    r.start = a;
    r.end = a + 16 * kPageSize;
    r.hmm_pfns = w.data();
    r.default_flags = kPfnReqFault | kPfnReqWrite;
    auto res = RangeFaultAndCommit(*as_, r, [&](HmmRange& rr) -> Result<bool> {
      MutexLock l(ops_.lock);
      if (sub_.ReadRetry(rr.notifier_seq)) return false;
      // Under the driver lock and with no retry, the snapshot is current.
      for (int i = 0; i < 16; ++i)
        if (!(w[i] & kPfnWrite)) return Err(Errc::kIo, "committed a non-writable page");
      ++committed;
      return true;
    });
    ASSERT_TRUE(res.has_value()) << res.error().ToString();
  }
  stop = true;
  churn.join();
  EXPECT_EQ(committed, 200);
}

TEST_F(HmmRangeFaultTest, CallerLoopGivesUpWithEtime) {
  Env env(std::make_unique<ManualClock>(), 1);
  auto as = testing::MakeSpace(*pool_, env);
  uint64_t a = *as->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  MmuIntervalNotifier sub;
  ASSERT_TRUE(as->notifiers().Insert(&sub, a, kPageSize, &ops_).has_value());
  std::vector<uint64_t> w(1);
  HmmRange r;
  r.notifier = &sub;
  r.start = a;
  r.end = a + kPageSize;
  r.hmm_pfns = w.data();
  int calls = 0;
  auto res = RangeFaultAndCommit(*as, r, [&](HmmRange&) -> Result<bool> {
    ++calls;
    env.SleepNs(1'000'000);  // each try costs 1 ms of (manual) time
    return false;            // always "retry"
  }, 10'000'000);
  EXPECT_EQ(res.error(), Errc::kTime);
  EXPECT_GE(calls, 10);
  ASSERT_TRUE(sub.Remove().has_value());
}

}  // namespace
}  // namespace usvm::mm
