// Rules of range fault, migrate_vma and dev_pagemap that follow the kernel
// (mm/hmm.c, mm/migrate_device.c, mm/memremap.c) where usvm used to differ.
#include <gtest/gtest.h>

#include <vector>

#include "dmirror.h"
#include "test_util.h"

namespace usvm::mm {
namespace {

class NullOps final : public DevicePagemapOps {
 public:
  Result<void> MigrateToRam(Mm&, uint64_t, DevicePagemap&, uint64_t) override {
    return Err(Errc::kFault, "unused");
  }
  Result<void> CopyToRam(DevicePagemap&, uint64_t, std::byte*) override {
    return Err(Errc::kFault, "unused");
  }
};

// memremap_pages: "Missing owner" -> EINVAL, for private and coherent.
TEST(HmmKernelRulesTest, DevicePagemapWithoutOwnerIsEinval) {
  NullOps ops;
  int owner = 0;
  EXPECT_EQ(DevicePagemap::TryCreate(4, nullptr, &ops).error(), Errc::kInval);
  EXPECT_EQ(DevicePagemap::TryCreate(4, nullptr, &ops, DeviceMemoryKind::kCoherent).error(),
            Errc::kInval);
  EXPECT_TRUE(DevicePagemap::TryCreate(4, &owner, &ops).has_value());
}

class Ignore final : public MmuIntervalNotifierOps {
 public:
  bool Invalidate(MmuIntervalNotifier* sub, const NotifierRange&, uint64_t cur_seq) override {
    sub->SetSeq(cur_seq);
    return true;
  }
};

// hmm_range_fault walks range->notifier->mm: a notifier inserted in
// another address space (or in none) is EINVAL, and nothing is faulted.
TEST(HmmKernelRulesTest, RangeFaultWithAnotherSpacesNotifierIsEinval) {
  auto pool = testing::MakePool(16);
  auto as = testing::MakeSpace(*pool);
  auto other = testing::MakeSpace(*pool);
  const uint64_t a = *as->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(other->Mmap(a, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous | kMapFixed)
                  .has_value());
  Ignore ops;
  MmuIntervalNotifier theirs, loose;
  ASSERT_TRUE(other->notifiers().Insert(&theirs, a, kPageSize, &ops).has_value());
  uint64_t word = 0;
  HmmRange r;
  r.start = a;
  r.end = a + kPageSize;
  r.hmm_pfns = &word;
  r.default_flags = kPfnReqFault | kPfnReqWrite;
  {
    r.notifier = &theirs;
    r.notifier_seq = theirs.ReadBegin();
    ReadLock l(as->mmap_lock());
    EXPECT_EQ(as->RangeFault(r).error(), Errc::kInval);
  }
  {
    // A notifier never inserted covers no range at all.
    r.notifier = &loose;
    ReadLock l(as->mmap_lock());
    EXPECT_EQ(as->RangeFault(r).error(), Errc::kInval);
  }
  EXPECT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kNone);
  EXPECT_EQ(other->QueryPte(a).kind, PteInfo::Kind::kNone);
  ASSERT_TRUE(theirs.Remove().has_value());
}

// hmm_pte_need_fault: without kPfnReqFault nothing is faulted, whatever
// kPfnReqWrite says: a snapshot, even of a read-only mapping (no EPERM).
TEST(HmmKernelRulesTest, WriteRequestWithoutFaultRequestIsASnapshot) {
  auto pool = testing::MakePool(16);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 4);
  const uint64_t a = *as->Mmap(0, 3 * kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(as->Mprotect(a + 2 * kPageSize, kPageSize, kProtRead).has_value());
  ASSERT_TRUE(dev->Watch(a, 3 * kPageSize).has_value());
  uint64_t v = 0;
  ASSERT_TRUE(as->Read(a + kPageSize, &v, 8).has_value());  // page 1: the zero page
  std::vector<uint64_t> words(3, 0);
  HmmRange r;
  r.notifier = nullptr;
  r.start = a;
  r.end = a + 3 * kPageSize;
  r.hmm_pfns = words.data();
  r.default_flags = kPfnReqWrite;
  r.dev_private_owner = dev.get();
  MmuIntervalNotifier sub;
  Ignore ops;
  ASSERT_TRUE(as->notifiers().Insert(&sub, a, 3 * kPageSize, &ops).has_value());
  r.notifier = &sub;
  r.notifier_seq = sub.ReadBegin();
  {
    ReadLock l(as->mmap_lock());
    ASSERT_TRUE(as->RangeFault(r).has_value());
  }
  EXPECT_EQ(words[0], 0u) << "absent page: not faulted";
  EXPECT_EQ(words[1] & (kPfnValid | kPfnWrite), kPfnValid) << "zero page reported read-only, no COW";
  EXPECT_EQ(words[2], 0u) << "read-only VMA: no EPERM";
  EXPECT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kNone);
  EXPECT_TRUE(as->QueryPte(a + kPageSize).zero_page);
  EXPECT_EQ(as->GetStats().cow_breaks, 0u);
  ASSERT_TRUE(sub.Remove().has_value());
}

// migrate_vma_collect: holes of anonymous memory are collected whatever
// the select flags; the zero page is a system page: only with
// kMigrateSelectSystem.
TEST(HmmKernelRulesTest, ZeroPageIsCollectedOnlyWithSelectSystem) {
  auto pool = testing::MakePool(16);
  auto as = testing::MakeSpace(*pool);
  const uint64_t a = *as->Mmap(0, 2 * kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  uint64_t v = 0;
  ASSERT_TRUE(as->Read(a, &v, 8).has_value());  // page 0: zero page; page 1: hole
  int owner = 0;
  for (uint32_t flags : {kMigrateSelectDevicePrivate, kMigrateSelectSystem}) {
    uint64_t src[2], dst[2];
    MigrateVma m;
    m.start = a;
    m.end = a + 2 * kPageSize;
    m.src = src;
    m.dst = dst;
    m.pgmap_owner = &owner;
    m.flags = flags;
    ReadLock l(as->mmap_lock());
    ASSERT_TRUE(as->MigrateVmaSetup(m).has_value());
    EXPECT_EQ(bool(src[0] & kMigratePfnMigrate), flags == kMigrateSelectSystem) << "zero page";
    EXPECT_TRUE(src[1] & kMigratePfnMigrate) << "hole";
    EXPECT_EQ(m.cpages, flags == kMigrateSelectSystem ? 2u : 1u);
    as->MigrateVmaPages(m);
    as->MigrateVmaFinalize(m);
  }
  EXPECT_TRUE(as->QueryPte(a).zero_page);
  EXPECT_EQ(as->QueryPte(a + kPageSize).kind, PteInfo::Kind::kNone);
}

// migrate_vma_setup: EINVAL for a vma that is not the one holding the
// range, and for a fault_page that is not a device page or not locked;
// nothing is collected then.
TEST(HmmKernelRulesTest, MigrateSetupChecksVmaAndFaultPage) {
  auto pool = testing::MakePool(16);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 4);
  const uint64_t a = *as->Mmap(0, 2 * kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  const uint64_t b = *as->Mmap(0, kPageSize, kProtRead, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(as->AtomicStore(a, 9).has_value());
  ASSERT_EQ(*dev->MigrateToDevice(a, a + kPageSize), 1u);
  const DevicePfn dpfn = as->QueryPte(a).pfn;
  const VmaInfo right = *as->FindVma(a), wrong = *as->FindVma(b);
  auto setup = [&](const VmaInfo* vma, uint64_t fault_page) {
    uint64_t src[1], dst[1];
    MigrateVma m;
    m.start = a;
    m.end = a + kPageSize;
    m.src = src;
    m.dst = dst;
    m.pgmap_owner = dev.get();
    m.flags = kMigrateSelectDevicePrivate;
    m.vma = vma;
    m.fault_page = fault_page;
    ReadLock l(as->mmap_lock());
    auto r = as->MigrateVmaSetup(m);
    if (r) {
      as->MigrateVmaPages(m);
      as->MigrateVmaFinalize(m);
    }
    return r;
  };
  EXPECT_EQ(setup(&wrong, 0).error(), Errc::kInval);
  EXPECT_EQ(setup(nullptr, dpfn).error(), Errc::kInval) << "fault_page not locked";
  EXPECT_EQ(setup(nullptr, 12345).error(), Errc::kInval) << "fault_page not a device page";
  EXPECT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
  EXPECT_FALSE(dev->pagemap().PageLocked(dev->pagemap().IndexOf(dpfn)));
  EXPECT_TRUE(setup(&right, 0).has_value());
  EXPECT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate) << "nothing copied: restored";
  EXPECT_EQ(*as->AtomicLoad(a), 9u);
}

// hmm_vma_handle_pte: the caller's own device-private page is reported as
// it is. Shared read-only after fork, a write request gets it without
// kPfnWrite and nothing is migrated (the driver decides; dmirror then
// brings its own view home before writing).
TEST(HmmKernelRulesTest, OwnReadOnlyDevicePageUnderWriteRequestIsReportedAsIs) {
  auto pool = testing::MakePool(16);
  auto as = testing::MakeSpace(*pool);
  auto dev = testing::DMirror::Create(as, 4);
  const uint64_t a = *as->Mmap(0, kPageSize, kProtRead | kProtWrite, kMapPrivate | kMapAnonymous);
  ASSERT_TRUE(dev->Watch(a, kPageSize).has_value());
  ASSERT_TRUE(as->AtomicStore(a, 42).has_value());
  ASSERT_EQ(*dev->MigrateToDevice(a, a + kPageSize), 1u);
  auto child = *as->Fork();
  ASSERT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate);
  ASSERT_FALSE(as->QueryPte(a).writable);
  std::vector<uint64_t> words;
  ASSERT_TRUE(dev->FaultIn(a, a + kPageSize, /*write=*/true, &words).has_value());
  EXPECT_EQ(words[0] & (kPfnValid | kPfnWrite | kPfnDevice), kPfnValid | kPfnDevice);
  EXPECT_EQ(as->QueryPte(a).kind, PteInfo::Kind::kDevicePrivate) << "not migrated home";
  EXPECT_EQ(dev->cpu_faults(), 0u);
  // The device write then gives the parent its own copy; the child keeps 42.
  const uint64_t nv = 7;
  ASSERT_TRUE(dev->Write(a, &nv, 8).has_value());
  EXPECT_EQ(*as->AtomicLoad(a), 7u);
  EXPECT_EQ(*child->AtomicLoad(a), 42u);
  child->Exit();
}

}  // namespace
}  // namespace usvm::mm
