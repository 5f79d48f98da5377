// Every shipped scenario (scenarios/*.yaml) validates, has a `short`
// setting for CI, and runs it to a verified end with no unexpected fault.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "usvm/sim/runner.h"
#include "usvm/sim/scenario.h"

namespace usvm::sim {
namespace {

std::vector<std::string> ShippedScenarios() {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(std::string(USVM_SOURCE_DIR) + "/scenarios"))
    if (e.path().extension() == ".yaml") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

class ShippedScenario : public ::testing::TestWithParam<std::string> {};

TEST_P(ShippedScenario, ValidatesAndRunsShortVariant) {
  auto s = ParseScenarioFile(GetParam());
  ASSERT_TRUE(s.has_value()) << s.error().ToString();
  auto it = s->settings.find("short");
  ASSERT_NE(it, s->settings.end()) << GetParam() << " has no `short` setting for CI";
  Scenario v = *s;
  for (const auto& [k, val] : it->second) ASSERT_TRUE(ApplyOverride(v, k, val).has_value()) << k;
  auto r = RunScenario(v);
  ASSERT_TRUE(r.has_value()) << r.error();
  EXPECT_FALSE(r->mismatch.has_value()) << r->mismatch->ToString();
  EXPECT_TRUE(r->metrics.verified);
  for (const RuntimeFault& f : r->metrics.runtime_faults)
    EXPECT_TRUE(f.expected) << GetParam() << ": " << f.step << ": " << f.error;
  EXPECT_GT(r->metrics.kernels, 0u);
}

INSTANTIATE_TEST_SUITE_P(Library, ShippedScenario, ::testing::ValuesIn(ShippedScenarios()),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = std::filesystem::path(i.param).stem().string();
                           for (char& c : n)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

// The commented example of docs/scenarios.md parses and runs clean.
TEST(ShippedScenarios, DocsExampleRuns) {
  std::ifstream in(std::string(USVM_SOURCE_DIR) + "/docs/scenarios.md");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string doc = ss.str();
  const size_t a = doc.find("```yaml\n");
  ASSERT_NE(a, std::string::npos);
  const size_t b = doc.find("```", a + 8);
  auto s = ParseScenarioString(doc.substr(a + 8, b - a - 8), "docs/scenarios.md example");
  ASSERT_TRUE(s.has_value()) << s.error().ToString();
  Scenario v = *s;
  // A copy: ApplyOverride replaces v (and v.settings with it) on success.
  const auto overrides = v.settings.at("short");
  for (const auto& [k, val] : overrides) ASSERT_TRUE(ApplyOverride(v, k, val).has_value()) << k;
  auto r = RunScenario(v);
  ASSERT_TRUE(r.has_value()) << r.error();
  EXPECT_TRUE(r->metrics.verified) << (r->mismatch ? r->mismatch->ToString() : "");
  EXPECT_EQ(r->metrics.unexpected_faults, 0u);
}

TEST(ShippedScenarios, LibraryIsThere) { EXPECT_GE(ShippedScenarios().size(), 11u); }

}  // namespace
}  // namespace usvm::sim
