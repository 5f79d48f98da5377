// The scenario parser: good files, malformed ones (the error names the
// file, the line and the field), sizes and overrides.
#include <gtest/gtest.h>

#include "usvm/sim/scenario.h"

namespace usvm::sim {
namespace {

constexpr const char* kGood = R"(name: t
seed: 7
machine:
  gpus: 2
  vram: 8MiB
framework:
  invalidation: single_pass
  chunk_sizes: [64KiB, 4KiB]
buffers:
  - {name: a, size: 4MiB}
  - {name: b, size: 64KiB, mapped: false}
settings:
  sys: {framework.placement: system}
phases:
  - name: p
    repeat: 2
    steps:
      - cpu_write: {buffer: a}
      - gpu_kernel: {gpu: 1, buffer: a, pattern: stride, stride: 4KiB}
      - loop:
          repeat: 3
          steps:
            - gpu_atomic: {buffer: a, size: 4KiB, count: 10}
      - fork:
      - prefetch: {gpu: 0, buffer: a, to: system}
      - advise: {buffer: a, preferred: gpu1, atomic: device}
)";

// Parses `text` and expects an error at `line` whose field contains
// `field` and whose message contains `msg`.
void ExpectError(const std::string& text, int line, const std::string& field, const std::string& msg) {
  auto r = ParseScenarioString(text, "bad.yaml");
  ASSERT_FALSE(r.has_value()) << "parsed: " << text;
  EXPECT_EQ(r.error().file, "bad.yaml");
  EXPECT_EQ(r.error().line, line) << r.error().ToString();
  EXPECT_NE(r.error().field.find(field), std::string::npos) << r.error().ToString();
  EXPECT_NE(r.error().message.find(msg), std::string::npos) << r.error().ToString();
  EXPECT_EQ(r.error().ToString().rfind("bad.yaml:" + std::to_string(line) + ": ", 0), 0u) << r.error().ToString();
}

TEST(ScenarioParser, GoodFile) {
  auto r = ParseScenarioString(kGood, "good.yaml");
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  const Scenario& s = *r;
  EXPECT_EQ(s.name, "t");
  EXPECT_EQ(s.seed, 7u);
  EXPECT_EQ(s.machine.gpus, 2u);
  EXPECT_EQ(s.machine.vram_bytes, uint64_t{8} << 20);
  EXPECT_EQ(s.framework.invalidation, "single_pass");
  ASSERT_EQ(s.framework.chunk_sizes.size(), 2u);
  EXPECT_EQ(s.framework.chunk_sizes[0], uint64_t{64} << 10);
  ASSERT_EQ(s.buffers.size(), 2u);
  EXPECT_FALSE(s.buffers[1].mapped);
  ASSERT_EQ(s.phases.size(), 1u);
  EXPECT_EQ(s.phases[0].repeat, 2u);
  const auto& st = s.phases[0].steps;
  ASSERT_EQ(st.size(), 6u);
  EXPECT_EQ(st[1].kind, StepKind::kGpuKernel);
  EXPECT_EQ(st[1].pattern, PatternKind::kStride);
  EXPECT_EQ(st[1].stride, 4096u);
  EXPECT_EQ(st[1].gpu, 1u);
  EXPECT_EQ(st[1].line, 19);
  EXPECT_EQ(st[2].kind, StepKind::kLoop);
  EXPECT_EQ(st[2].repeat, 3u);
  ASSERT_EQ(st[2].steps.size(), 1u);
  EXPECT_EQ(st[2].steps[0].kind, StepKind::kGpuAtomic);
  EXPECT_EQ(st[3].kind, StepKind::kFork);
  EXPECT_EQ(st[4].str, "system");
  EXPECT_EQ(st[5].str, "gpu1");
  EXPECT_EQ(st[5].atomic_mode, "device");
  ASSERT_EQ(s.settings.count("sys"), 1u);
}

TEST(ScenarioParser, DefaultScenarioParses) {
  auto r = ParseScenarioString(DefaultScenarioYaml(), "<default>");
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(r->machine.gpus, 2u);
  uint64_t total = 0;
  for (const auto& b : r->buffers) total = std::max(total, b.size);
  EXPECT_GE(total, 2 * r->machine.vram_bytes);  // oversubscribed 2x
}

TEST(ScenarioParser, Sizes) {
  uint64_t v = 0;
  EXPECT_TRUE(ParseSize("4096", &v));
  EXPECT_EQ(v, 4096u);
  EXPECT_TRUE(ParseSize("64KiB", &v));
  EXPECT_EQ(v, 65536u);
  EXPECT_TRUE(ParseSize("2 MiB", &v));
  EXPECT_EQ(v, uint64_t{2} << 20);
  EXPECT_TRUE(ParseSize("1G", &v));
  EXPECT_EQ(v, uint64_t{1} << 30);
  EXPECT_FALSE(ParseSize("", &v));
  EXPECT_FALSE(ParseSize("MiB", &v));
  EXPECT_FALSE(ParseSize("4XB", &v));
  EXPECT_FALSE(ParseSize("-4", &v));
  EXPECT_FALSE(ParseSize("99999999999999999999", &v));
  EXPECT_FALSE(ParseSize("18446744073709551615GiB", &v));
}

TEST(ScenarioParser, YamlSyntaxError) {
  ExpectError("name: x\nbuffers: [\n  {name: a, size: 4KiB}\nphases: x: y\n", 4, "", "YAML syntax");
}

TEST(ScenarioParser, UnknownTopLevelField) {
  ExpectError("name: x\nbufers: []\n", 2, "bufers", "unknown field");
}

TEST(ScenarioParser, MissingBuffers) {
  ExpectError("name: x\nphases: []\n", 1, "buffers", "missing");
}

TEST(ScenarioParser, BadVram) {
  ExpectError("machine:\n  gpus: 1\n  vram: 3MiB\nbuffers: []\n", 3, "machine.vram", "multiple of 2MiB");
}

TEST(ScenarioParser, GpusOutOfRange) {
  ExpectError("machine:\n  gpus: 9\n", 2, "machine.gpus", "out of range");
}

TEST(ScenarioParser, BadBufferSize) {
  ExpectError("buffers:\n  - name: a\n    size: 100\nphases: []\n", 3, "buffers[0].size", "multiple of 4KiB");
}

TEST(ScenarioParser, DuplicateBuffer) {
  ExpectError("buffers:\n  - {name: a, size: 4KiB}\n  - {name: a, size: 4KiB}\n", 3, "buffers[1].name", "duplicate");
}

TEST(ScenarioParser, UnknownAction) {
  ExpectError(
      "buffers:\n  - {name: a, size: 4KiB}\nphases:\n  - steps:\n      - cpu_write: {buffer: a}\n"
      "      - gpu_kernal: {buffer: a}\n",
      6, "phases[0].steps[1].gpu_kernal", "unknown action");
}

TEST(ScenarioParser, BadPattern) {
  ExpectError(
      "buffers:\n  - {name: a, size: 4KiB}\nphases:\n  - steps:\n      - gpu_kernel:\n          buffer: a\n"
      "          pattern: zigzag\n",
      7, "phases[0].steps[0].gpu_kernel.pattern", "not one of");
}

TEST(ScenarioParser, UnknownStepField) {
  ExpectError("buffers:\n  - {name: a, size: 4KiB}\nphases:\n  - steps:\n      - cpu_write: {buffer: a, colour: red}\n",
              5, "cpu_write.colour", "unknown field");
}

TEST(ScenarioParser, UnknownBufferInStep) {
  ExpectError("buffers:\n  - {name: a, size: 4KiB}\nphases:\n  - steps:\n      - cpu_write: {buffer: b}\n", 5,
              "cpu_write.buffer", "no buffer named 'b'");
}

TEST(ScenarioParser, SpanBeyondBuffer) {
  ExpectError(
      "buffers:\n  - {name: a, size: 8KiB}\nphases:\n  - steps:\n      - cpu_write: {buffer: a, offset: 4KiB, size: 8KiB}\n",
      5, "cpu_write.size", "beyond buffer");
}

TEST(ScenarioParser, GpuBeyondMachine) {
  ExpectError(
      "machine: {gpus: 1}\nbuffers:\n  - {name: a, size: 8KiB}\nphases:\n  - steps:\n"
      "      - gpu_kernel: {gpu: 1, buffer: a, pattern: stream_read}\n",
      6, "gpu_kernel.gpu", "does not exist");
}

TEST(ScenarioParser, ComputeStep) {
  auto r = ParseScenarioString(
      "buffers:\n  - {name: a, size: 2MiB}\n  - {name: b, size: 2MiB}\n  - {name: c, size: 2MiB}\nphases:\n"
      "  - steps:\n      - gpu_compute: {kernel: gemm, a: a, b: b, c: c, n: 256}\n"
      "      - gpu_compute: {kernel: bfs, a: a, c: c, n: 1000, k: 4}\n",
      "c.yaml");
  ASSERT_TRUE(r.has_value()) << r.error().ToString();
  EXPECT_EQ(r->phases[0].steps[0].compute, ComputeKind::kGemm);
  EXPECT_EQ(r->phases[0].steps[1].k, 4u);
  // 512 x 512 words do not fit 2 MiB... they do exactly; 513 do not.
  ExpectError(
      "buffers:\n  - {name: a, size: 2MiB}\n  - {name: b, size: 2MiB}\n  - {name: c, size: 2MiB}\nphases:\n"
      "  - steps:\n      - gpu_compute: {kernel: gemm, a: a, b: b, c: c, n: 513}\n",
      7, "gpu_compute.a", "needs 2105352 bytes");
  ExpectError(
      "buffers:\n  - {name: a, size: 2MiB}\nphases:\n  - steps:\n      - gpu_compute: {kernel: spmv, a: a, c: a, n: 8}\n",
      5, "gpu_compute.b", "missing");
  ExpectError(
      "buffers:\n  - {name: a, size: 2MiB}\nphases:\n  - steps:\n"
      "      - gpu_compute: {kernel: stencil, a: a, c: a, n: 8, k: 2}\n",
      5, "gpu_compute.k", "not used by stencil");
  ExpectError(
      "buffers:\n  - {name: a, size: 2MiB}\n  - {name: c, size: 2MiB}\nphases:\n  - steps:\n"
      "      - gpu_compute: {kernel: fft, a: a, c: c, n: 8}\n",
      6, "gpu_compute.kernel", "not one of");
}

TEST(ScenarioParser, BadSettingOverride) {
  ExpectError(
      "buffers:\n  - {name: a, size: 8KiB}\nsettings:\n  x: {framework.colour: red}\nphases:\n  - steps:\n"
      "      - cpu_write: {buffer: a}\n",
      4, "settings.x.framework.colour", "unknown key");
}

TEST(ScenarioParser, MissingFile) {
  auto r = ParseScenarioFile("/nonexistent/x.yaml");
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().ToString().find("/nonexistent/x.yaml"), std::string::npos);
}

TEST(ScenarioParser, BadFilesInTestData) {
  // Each file in tests/sim/data/bad_*.yaml names its expected error in its
  // first line: "# LINE FIELD".
  for (const char* name : {"bad_line.yaml", "bad_nested.yaml"}) {
    const std::string path = std::string(USVM_TEST_DATA) + "/" + name;
    auto r = ParseScenarioFile(path);
    ASSERT_FALSE(r.has_value()) << path;
    FILE* f = fopen(path.c_str(), "r");
    ASSERT_NE(f, nullptr);
    char buf[256] = {};
    ASSERT_NE(fgets(buf, sizeof buf, f), nullptr);
    fclose(f);
    int line = 0;
    char field[200] = {};
    ASSERT_EQ(sscanf(buf, "# %d %199s", &line, field), 2) << buf;
    EXPECT_EQ(r.error().file, path);
    EXPECT_EQ(r.error().line, line) << r.error().ToString();
    EXPECT_EQ(r.error().field, field) << r.error().ToString();
  }
}

// Bad input never crashes: thousands of mangled versions of real
// scenarios (bytes dropped, duplicated, replaced; lines swapped) each
// parse or give an error with a message.
TEST(ScenarioParser, MangledInputNeverCrashes) {
  std::vector<std::string> seeds = {kGood, DefaultScenarioYaml(),
                                    "buffers: 5\nphases: [1, [2], {a: b}]\n",
                                    "? [a, b]\n: c\nbuffers:\n  - {name: [x], size: {a: 1}}\n"};
  uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
  };
  const char alphabet[] = " \n:-{}[],#&*!|>'\"%@`abc019";
  int parsed = 0, errors = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string t = seeds[i % seeds.size()];
    const int edits = 1 + next() % 6;
    for (int e = 0; e < edits && !t.empty(); ++e) {
      const size_t at = next() % t.size();
      switch (next() % 4) {
        case 0: t.erase(at, 1 + next() % 8); break;
        case 1: t.insert(at, 1, alphabet[next() % (sizeof alphabet - 1)]); break;
        case 2: t[at] = alphabet[next() % (sizeof alphabet - 1)]; break;
        case 3: {
          const size_t len = std::min<size_t>(t.size() - at, 1 + next() % 40);
          t.insert(next() % t.size(), t.substr(at, len));
          break;
        }
      }
    }
    auto r = ParseScenarioString(t, "fuzz.yaml");
    if (r) {
      ++parsed;
    } else {
      ++errors;
      EXPECT_FALSE(r.error().message.empty()) << t;
      EXPECT_EQ(r.error().file, "fuzz.yaml");
    }
  }
  EXPECT_GT(errors, 100);
  EXPECT_GT(parsed, 10);
}

TEST(ScenarioOverride, KnownKeys) {
  auto r = ParseScenarioString(kGood, "good.yaml");
  ASSERT_TRUE(r.has_value());
  Scenario s = *r;
  ASSERT_TRUE(ApplyOverride(s, "seed=99").has_value());
  EXPECT_EQ(s.seed, 99u);
  ASSERT_TRUE(ApplyOverride(s, "framework.invalidation=two_pass").has_value());
  EXPECT_EQ(s.framework.invalidation, "two_pass");
  ASSERT_TRUE(ApplyOverride(s, "machine.vram=32MiB").has_value());
  EXPECT_EQ(s.machine.vram_bytes, uint64_t{32} << 20);
  ASSERT_TRUE(ApplyOverride(s, "framework.chunk_sizes=2MiB,4KiB").has_value());
  EXPECT_EQ(s.framework.chunk_sizes.size(), 2u);
  ASSERT_TRUE(ApplyOverride(s, "buffers.a.size=8MiB").has_value());
  EXPECT_EQ(s.buffers[0].size, uint64_t{8} << 20);
  ASSERT_TRUE(ApplyOverride(s, "verify=false").has_value());
  EXPECT_FALSE(s.verify);
}

TEST(ScenarioOverride, BadKeysAndValues) {
  auto r = ParseScenarioString(kGood, "good.yaml");
  ASSERT_TRUE(r.has_value());
  Scenario s = *r;
  auto e = ApplyOverride(s, "framework.colour=red");
  ASSERT_FALSE(e.has_value());
  EXPECT_NE(e.error().ToString().find("unknown key"), std::string::npos);
  EXPECT_NE(e.error().ToString().find("framework.colour"), std::string::npos);
  EXPECT_FALSE(ApplyOverride(s, "nokey").has_value());
  EXPECT_FALSE(ApplyOverride(s, "=3").has_value());
  EXPECT_FALSE(ApplyOverride(s, "seed=abc").has_value());
  EXPECT_FALSE(ApplyOverride(s, "framework.invalidation=three_pass").has_value());
  EXPECT_FALSE(ApplyOverride(s, "machine.vram=3MiB").has_value());
  EXPECT_FALSE(ApplyOverride(s, "buffers.zz.size=4KiB").has_value());
  // Cross-field: the steps name GPU 1.
  auto g = ApplyOverride(s, "machine.gpus=1");
  ASSERT_FALSE(g.has_value());
  EXPECT_NE(g.error().ToString().find("does not exist"), std::string::npos);
  EXPECT_EQ(s.machine.gpus, 2u);  // a failed override changes nothing
  // A buffer shrunk below a step's explicit span.
  auto r2 = ParseScenarioString(
      "buffers:\n  - {name: a, size: 8KiB}\nphases:\n  - steps:\n      - cpu_write: {buffer: a, offset: 4KiB}\n",
      "x.yaml");
  ASSERT_TRUE(r2.has_value()) << r2.error().ToString();
  Scenario s2 = *r2;
  auto sh = ApplyOverride(s2, "buffers.a.size=4KiB");
  ASSERT_FALSE(sh.has_value());
  EXPECT_NE(sh.error().ToString().find("beyond buffer"), std::string::npos) << sh.error().ToString();
}

}  // namespace
}  // namespace usvm::sim
