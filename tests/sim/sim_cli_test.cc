// The usvm CLI: exit codes (0 ok, 1 mismatch, 2 bad input), one-line
// errors, --json and --trace output.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sys/wait.h>

namespace {

struct Out {
  int code = -1;
  std::string text;  // stdout and stderr
};

Out Usvm(const std::string& args) {
  Out o;
  const std::string cmd = std::string(USVM_BIN) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return o;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) o.text.append(buf, n);
  const int st = pclose(p);
  o.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return o;
}

std::string Tmp(const std::string& name) {
  return ::testing::TempDir() + "/usvm_cli_" + std::to_string(getpid()) + "_" + name;
}

std::string WriteTmp(const std::string& name, const std::string& text) {
  const std::string p = Tmp(name);
  std::ofstream(p) << text;
  return p;
}

constexpr const char* kTiny = R"(name: tiny
machine: {gpus: 2, vram: 2MiB, system_memory: 32MiB}
buffers: [{name: a, size: 4MiB}]
settings:
  one: {framework.invalidation: single_pass}
  two: {framework.invalidation: two_pass}
phases:
  - steps:
      - cpu_write: {buffer: a}
      - gpu_kernel: {gpu: 0, buffer: a, pattern: read_modify_write}
      - gpu_kernel: {gpu: 1, buffer: a, pattern: stream_read}
      - munmap: {buffer: a, offset: 1MiB, size: 1MiB}
      - cpu_write: {buffer: a, size: 64KiB}
)";

TEST(UsvmCli, HelpAndVersion) {
  Out h = Usvm("--help");
  EXPECT_EQ(h.code, 0);
  EXPECT_NE(h.text.find("run"), std::string::npos);
  EXPECT_NE(h.text.find("validate"), std::string::npos);
  Out v = Usvm("--version");
  EXPECT_EQ(v.code, 0);
  EXPECT_NE(v.text.find("usvm "), std::string::npos);
  Out rh = Usvm("run --help");
  EXPECT_EQ(rh.code, 0);
  EXPECT_NE(rh.text.find("--compare"), std::string::npos);
}

TEST(UsvmCli, ValidateGoodAndBad) {
  Out g = Usvm("validate " + WriteTmp("good.yaml", kTiny));
  EXPECT_EQ(g.code, 0) << g.text;
  EXPECT_NE(g.text.find("ok"), std::string::npos);
  const std::string bad = std::string(USVM_TEST_DATA) + "/bad_line.yaml";
  Out b = Usvm("validate " + bad);
  EXPECT_EQ(b.code, 2) << b.text;
  EXPECT_NE(b.text.find(bad + ":8: machine.latency:"), std::string::npos) << b.text;
  EXPECT_EQ(std::count(b.text.begin(), b.text.end(), '\n'), 1) << b.text;  // one line
  Out r = Usvm("run " + bad);
  EXPECT_EQ(r.code, 2) << r.text;
  Out m = Usvm("validate /nonexistent.yaml");
  EXPECT_EQ(m.code, 2) << m.text;
}

TEST(UsvmCli, BadSetIsOneLineExit2) {
  const std::string f = WriteTmp("set.yaml", kTiny);
  Out o = Usvm("run " + f + " --set framework.colour=red");
  EXPECT_EQ(o.code, 2) << o.text;
  EXPECT_NE(o.text.find("framework.colour"), std::string::npos) << o.text;
  EXPECT_EQ(std::count(o.text.begin(), o.text.end(), '\n'), 1) << o.text;
  Out v = Usvm("run " + f + " --set machine.gpus=0");
  EXPECT_EQ(v.code, 2) << v.text;
  Out n = Usvm("run " + f + " --set nokey");
  EXPECT_EQ(n.code, 2) << n.text;
  Out cmd = Usvm("frob");
  EXPECT_EQ(cmd.code, 2) << cmd.text;
  Out u = Usvm("run " + f + " --bogus");
  EXPECT_EQ(u.code, 2) << u.text;
  Out c = Usvm("run " + f + " --compare one,nope");
  EXPECT_EQ(c.code, 2) << c.text;
  EXPECT_NE(c.text.find("nope"), std::string::npos) << c.text;
}

TEST(UsvmCli, RunWritesJsonAndTrace) {
  const std::string f = WriteTmp("run.yaml", kTiny);
  const std::string json = Tmp("m.json"), trace = Tmp("t.json");
  Out o = Usvm("run " + f + " --seed 9 --set framework.placement=faulting_gpu --json " + json + " --trace " + trace);
  ASSERT_EQ(o.code, 0) << o.text;
  EXPECT_NE(o.text.find("verification"), std::string::npos) << o.text;
  auto m = nlohmann::json::parse(std::ifstream(json), nullptr, false);
  ASSERT_FALSE(m.is_discarded());
  EXPECT_EQ(m["seed"], 9);
  EXPECT_EQ(m["verification"]["result"], "ok");
  EXPECT_GT(m["gpu_faults"]["count"].get<int>(), 0);
  auto t = nlohmann::json::parse(std::ifstream(trace), nullptr, false);
  ASSERT_FALSE(t.is_discarded()) << "the trace is not valid JSON";
  ASSERT_TRUE(t.contains("traceEvents"));
  std::set<std::string> cats, procs;
  for (const auto& e : t["traceEvents"]) {
    ASSERT_TRUE(e.contains("ph") && e.contains("pid"));
    if (e.contains("cat")) cats.insert(e["cat"].get<std::string>());
    if (e["ph"] == "M" && e["name"] == "process_name") procs.insert(e["args"]["name"].get<std::string>());
    if (e.value("cat", "") == "migration") {
      EXPECT_TRUE(e["args"].contains("reason")) << e.dump();
    }
  }
  for (const char* c : {"fault", "migration", "invalidation", "tlb", "kernel", "cpu"})
    EXPECT_TRUE(cats.count(c)) << "no '" << c << "' events in the trace";
  EXPECT_TRUE(procs.count("CPU") && procs.count("GPU 0") && procs.count("GPU 1"));
  // --set is repeatable, each takes one value (the file may follow it).
  Out two = Usvm("run --set seed=4 " + f + " --set machine.gpus=3 --quiet --json " + json);
  ASSERT_EQ(two.code, 0) << two.text;
  auto m2 = nlohmann::json::parse(std::ifstream(json), nullptr, false);
  EXPECT_EQ(m2["seed"], 4);
  EXPECT_EQ(m2["gpus"], 3);
  EXPECT_EQ(m2["scenario"], "tiny");
  Out q = Usvm("run " + f + " --quiet");
  EXPECT_EQ(q.code, 0);
  EXPECT_EQ(q.text, "");
}

TEST(UsvmCli, Compare) {
  const std::string f = WriteTmp("cmp.yaml", kTiny);
  const std::string json = Tmp("cmp.json");
  Out o = Usvm("run " + f + " --compare one,two --json " + json);
  ASSERT_EQ(o.code, 0) << o.text;
  EXPECT_NE(o.text.find("one"), std::string::npos);
  EXPECT_NE(o.text.find("two"), std::string::npos);
  auto m = nlohmann::json::parse(std::ifstream(json), nullptr, false);
  ASSERT_TRUE(m.is_array());
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0]["verification"]["result"], "ok");
  EXPECT_EQ(m[1]["verification"]["result"], "ok");
  EXPECT_EQ(m[0]["verification"]["bytes_verified"], m[1]["verification"]["bytes_verified"]);
  EXPECT_EQ(m[0]["invalidations"]["two_pass_finishes"], 0);
}

TEST(UsvmCli, MismatchExits1AndNamesTheByte) {
  const std::string f = WriteTmp("mm.yaml", kTiny);
  Out o = Usvm("run " + f + " --quiet --corrupt-reference 0:a:4096");
  EXPECT_EQ(o.code, 1) << o.text;
  EXPECT_NE(o.text.find("data mismatch in buffer 'a' at va 0x200000001000"), std::string::npos) << o.text;
  EXPECT_NE(o.text.find("last step that touched it"), std::string::npos) << o.text;
}

TEST(UsvmCli, DefaultRunExitsZero) {
  Out o = Usvm("run");
  EXPECT_EQ(o.code, 0) << o.text;
  EXPECT_NE(o.text.find("scenario default"), std::string::npos) << o.text;
  EXPECT_NE(o.text.find("ok ("), std::string::npos) << o.text;
}

}  // namespace
