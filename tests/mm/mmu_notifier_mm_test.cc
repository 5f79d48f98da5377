// Notifier rules that need a real address space: the mmap-lock rules of
// InsertLocked/RegisterLocked/GetLocked, the sticky fast path, events from
// address space operations reaching interval callbacks, and teardown.
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "usvm/base/mutex.h"
#include "usvm/mm/address_space.h"
#include "usvm/mm/frame_pool.h"
#include "usvm/mm/mmu_notifier.h"

namespace usvm::mm {
namespace {

constexpr uint64_t kPage = 4096;

class Fixture : public ::testing::Test {
 protected:
  void SetUp() override {
    auto pool = FramePool::TryCreate(32 << 20);
    ASSERT_TRUE(pool.has_value());
    pool_ = std::move(*pool);
    auto as = AddressSpace::TryCreate(*pool_);
    ASSERT_TRUE(as.has_value());
    as_ = *as;
  }
  std::unique_ptr<FramePool> pool_;
  std::shared_ptr<AddressSpace> as_;
};

class EventOps : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange& r, uint64_t cur_seq) override {
    MutexLock l(mu);
    sub->SetSeq(cur_seq);
    events.push_back(r.event);
    return true;
  }
  std::vector<NotifyEvent> Take() {
    MutexLock l(mu);
    return std::exchange(events, {});
  }
  Mutex mu;
  std::vector<NotifyEvent> events USVM_GUARDED_BY(mu);
};

class ReleaseCounter : public MmuNotifier {
 public:
  void Release(AddressSpace& mm) override {
    ++releases;
    seen = &mm;
  }
  int releases = 0;
  AddressSpace* seen = nullptr;
};

using MmuNotifierMmTest = Fixture;

TEST_F(MmuNotifierMmTest, InsertLockedRequiresTheMmapWriteLock) {
  EventOps ops;
  MmuIntervalNotifier sub;
  auto& hub = as_->notifiers();
  EXPECT_EQ(hub.InsertLocked(&sub, 0x100000, kPage, &ops).error(), Errc::kInval);
  {
    ReadLock l(as_->mmap_lock());
    EXPECT_EQ(hub.InsertLocked(&sub, 0x100000, kPage, &ops).error(), Errc::kInval);
  }
  {
    WriteLock l(as_->mmap_lock());
    ASSERT_TRUE(hub.InsertLocked(&sub, 0x100000, kPage, &ops));
  }
  EXPECT_EQ(sub.mm(), as_.get());
  ASSERT_TRUE(hub.Remove(&sub));
  ReleaseCounter n;
  EXPECT_EQ(hub.RegisterLocked(&n).error(), Errc::kInval);
  {
    WriteLock l(as_->mmap_lock());
    ASSERT_TRUE(hub.RegisterLocked(&n));
  }
  ASSERT_TRUE(hub.Unregister(&n));
  EXPECT_EQ(n.releases, 1);  // unregister calls Release, as the kernel does
  EXPECT_EQ(n.seen, as_.get());
}

TEST_F(MmuNotifierMmTest, HasSubscribersIsStickyForIntervalNotifiers) {
  auto& hub = as_->notifiers();
  EXPECT_FALSE(hub.HasSubscribers());
  EventOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(hub.Insert(&sub, 0x100000, kPage, &ops));  // takes the mmap lock once
  EXPECT_TRUE(hub.HasSubscribers());
  ASSERT_TRUE(hub.Remove(&sub));
  EXPECT_TRUE(hub.HasSubscribers());  // like the kernel's mm_has_notifiers
}

TEST_F(MmuNotifierMmTest, AddressSpaceOperationsReachIntervalCallbacksWithTheirEvent) {
  const uint64_t len = 16 * kPage;
  auto base = as_->Mmap(0, len, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(base.has_value());
  auto other = as_->Mmap(0, kPage, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(other.has_value());
  ASSERT_TRUE(*other + kPage <= *base || *other >= *base + len);
  EventOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(as_->notifiers().Insert(&sub, *base, len, &ops));
  uint64_t v = 1;
  ASSERT_TRUE(as_->Write(*base, &v, sizeof(v)));
  ASSERT_TRUE(as_->Mprotect(*base, kPage, kProtRead));
  auto events = ops.Take();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), NotifyEvent::kProtectionVma);
  ASSERT_TRUE(as_->Madvise(*base + kPage, kPage, kMadvDontNeed));
  events = ops.Take();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), NotifyEvent::kClear);
  ASSERT_TRUE(as_->Munmap(*base + 2 * kPage, kPage));
  events = ops.Take();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), NotifyEvent::kUnmap);
  // A mapping outside the subscription does not call it.
  ASSERT_TRUE(as_->Munmap(*other, kPage));
  EXPECT_TRUE(ops.Take().empty());
  ASSERT_TRUE(as_->notifiers().Remove(&sub));
}

TEST_F(MmuNotifierMmTest, ExitSendsOneReleaseAndCallsClassicReleaseOnce) {
  EventOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(as_->notifiers().Insert(&sub, 0x100000, kPage, &ops));
  ReleaseCounter n;
  ASSERT_TRUE(as_->notifiers().Register(&n));
  as_->Exit();
  auto events = ops.Take();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0], NotifyEvent::kRelease);
  EXPECT_EQ(n.releases, 1);
  ASSERT_TRUE(as_->notifiers().Unregister(&n));  // after release: no-op
  EXPECT_EQ(n.releases, 1);
  // The subscription stays until its owner removes it.
  EXPECT_EQ(sub.hub(), &as_->notifiers());
  ASSERT_TRUE(as_->notifiers().Remove(&sub));
}


// Regression (issue 8, bug 5): Insert did not keep the address space
// alive, so Remove after the owner dropped its last reference used the
// freed hub. The kernel takes mmgrab at insert and mmdrop at remove.
TEST_F(MmuNotifierMmTest, RemoveAfterTheLastAddressSpaceReferenceWasDropped) {
  EventOps ops;
  MmuIntervalNotifier sub;
  ASSERT_TRUE(as_->notifiers().Insert(&sub, 0x100000, 16 * kPage, &ops));
  std::weak_ptr<AddressSpace> weak = as_;
  as_->Exit();   // the process is gone (mmput) ...
  as_.reset();   // ... and so is every other reference
  EXPECT_FALSE(weak.expired()) << "an inserted subscription must keep its address space";
  EXPECT_EQ(sub.mm(), weak.lock().get());
  ASSERT_TRUE(sub.Remove());  // reaches the hub, then drops the last reference
  EXPECT_TRUE(weak.expired());
  EXPECT_EQ(sub.hub(), nullptr);
}


// Regression (issue 8, bug 4): Put of a Get'ed notifier from its own
// Release callback failed with EDEADLK and the free op never ran; the
// kernel allows mmu_notifier_put from ->release (the free is deferred).
TEST_F(MmuNotifierMmTest, PutFromItsOwnReleaseFreesTheNotifier) {
  struct SelfPutting : MmuNotifier {
    Result<void> put_result = Err(Errc::kInval, "not called");
    void Release(AddressSpace& mm) override { put_result = mm.notifiers().Put(this); }
  };
  struct Alloc : MmuNotifierAllocator {
    Result<MmuNotifier*> AllocNotifier(AddressSpace*) override { return new SelfPutting(); }
    void FreeNotifier(MmuNotifier* n) override {
      auto* s = static_cast<SelfPutting*>(n);
      put_ok = s->put_result.has_value();
      ++frees;
      delete s;
    }
    bool put_ok = false;
    int frees = 0;
  } alloc;
  ASSERT_TRUE(as_->notifiers().Get(&alloc));
  as_->Exit();
  EXPECT_EQ(alloc.frees, 1);
  EXPECT_TRUE(alloc.put_ok);
}

}  // namespace
}  // namespace usvm::mm
