#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "usvm/base/env.h"
#include "usvm/base/intrusive_list.h"
#include "usvm/base/result.h"

namespace usvm {
namespace {

Result<int> Half(int x) {
  if (x % 2) return Err(Errc::kInval, "odd");
  return x / 2;
}

Result<int> Quarter(int x) {
  int h = USVM_TRY(Half(x));
  return USVM_TRY(Half(h));
}

Result<void> CheckEven(int x) {
  USVM_TRY(Half(x));
  return {};
}

TEST(ResultTest, TryPropagatesErrorAndValue) {
  EXPECT_EQ(*Quarter(8), 2);
  auto r = Quarter(6);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::kInval);
  EXPECT_STREQ(r.error().what(), "odd");
  EXPECT_TRUE(CheckEven(4).has_value());
  EXPECT_EQ(CheckEven(3).error().code(), Errc::kInval);
}

TEST(ErrorTest, ToStringNamesTheCode) {
  EXPECT_EQ(Error(Errc::kFault, "no vma").ToString(), "EFAULT: no vma");
  EXPECT_EQ(Error(Errc::kAgain).ToString(), "EAGAIN");
  EXPECT_EQ(Error(Errc::kNoMem).errnum(), ENOMEM);
}

struct Item {
  int v;
  ListNode link;
};

TEST(IntrusiveListTest, PushEraseIterate) {
  IntrusiveList<Item, &Item::link> list;
  Item a{1, {}}, b{2, {}}, c{3, {}};
  list.push_back(&a);
  list.push_back(&b);
  list.push_front(&c);
  EXPECT_EQ(list.size(), 3u);
  std::vector<int> seen;
  list.ForEach([&](Item* i) { seen.push_back(i->v); });
  EXPECT_EQ(seen, (std::vector<int>{3, 1, 2}));
  list.erase(&a);
  EXPECT_FALSE(a.link.linked());
  EXPECT_EQ(list.front()->v, 3);
  EXPECT_EQ(list.next(list.front())->v, 2);
  EXPECT_EQ(list.next(&b), nullptr);
  EXPECT_EQ(list.pop_front()->v, 3);
  EXPECT_EQ(list.pop_front()->v, 2);
  EXPECT_TRUE(list.empty());
  EXPECT_EQ(list.pop_front(), nullptr);
}

TEST(FaultInjectorTest, NthCallFailsOnce) {
  FaultInjector f;
  EXPECT_FALSE(f.ShouldFail("site"));
  f.FailNth("site", 3);
  EXPECT_FALSE(f.ShouldFail("site"));
  EXPECT_FALSE(f.ShouldFail("other"));
  EXPECT_FALSE(f.ShouldFail("site"));
  EXPECT_TRUE(f.ShouldFail("site"));
  EXPECT_FALSE(f.ShouldFail("site"));
  EXPECT_EQ(f.Failures("site"), 1u);
}

TEST(FaultInjectorTest, EveryAndClear) {
  FaultInjector f;
  f.FailEvery("s", 2);
  std::vector<bool> got;
  for (int i = 0; i < 6; ++i) got.push_back(f.ShouldFail("s"));
  EXPECT_EQ(got, (std::vector<bool>{false, true, false, true, false, true}));
  f.Clear("s");
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(f.ShouldFail("s"));
}

TEST(FaultInjectorTest, ProbabilityIsDeterministicPerSeed) {
  auto draw = [](uint64_t seed) {
    FaultInjector f(seed);
    f.FailWithProbability("p", 0.3);
    std::vector<bool> v;
    for (int i = 0; i < 200; ++i) v.push_back(f.ShouldFail("p"));
    return v;
  };
  auto a = draw(7), b = draw(7);
  EXPECT_EQ(a, b);
  int n = 0;
  for (bool x : a) n += x;
  EXPECT_GT(n, 30);
  EXPECT_LT(n, 90);
}

TEST(EnvTest, ManualClockSleepAdvances) {
  Env env(std::make_unique<ManualClock>(100), 5);
  EXPECT_EQ(env.NowNs(), 100u);
  env.SleepNs(50);
  EXPECT_EQ(env.NowNs(), 150u);
  Rng a = env.NewRng(1), b = env.NewRng(1), c = env.NewRng(2);
  uint64_t x = a.Next();
  EXPECT_EQ(x, b.Next());
  EXPECT_NE(x, c.Next());
}

TEST(RngTest, UniformStaysInRange) {
  Rng r(3);
  for (int i = 0; i < 10000; ++i) ASSERT_LT(r.Uniform(17), 17u);
}

}  // namespace
}  // namespace usvm
