// usvm: the command-line tool. Every failure prints one line and exits
// non-zero: 1 a data mismatch (or a run that could not finish), 2 bad
// input (a malformed scenario, an unknown option or --set key).
#include <fmt/core.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <charconv>
#include <cstring>
#include <fstream>
#include <string_view>

#include "demo.h"
#include "usvm/fuzz/fuzz.h"
#include "usvm/sim/runner.h"
#include "usvm/sim/scenario.h"

#ifndef USVM_VERSION
#define USVM_VERSION "0.0.0"
#endif

namespace {

constexpr int kExitMismatch = 1;
constexpr int kExitBadInput = 2;

bool ParseU64(std::string_view s, uint64_t* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

int Fail(const std::string& msg, int code = kExitBadInput) {
  fmt::print(stderr, "usvm: {}\n", msg);
  return code;
}

// `usvm demo` keeps its own small parser (the pre-scenario demonstration).
int Demo(int argc, char** argv) {
  usvm::tools::DemoOptions opts;
  for (int i = 2; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&](uint64_t lo, uint64_t hi, uint64_t* out) -> bool {
      if (i + 1 >= argc) return false;
      return ParseU64(argv[++i], out) && *out >= lo && *out <= hi;
    };
    uint64_t v = 0;
    if (a == "--buffer-mib") {
      if (!value(2, 1024, &v)) return Fail("--buffer-mib needs an integer in [2, 1024]");
      opts.buffer_mib = v;
    } else if (a == "--gpu-threads") {
      if (!value(1, 16, &v)) return Fail("--gpu-threads needs an integer in [1, 16]");
      opts.gpu_threads = static_cast<uint32_t>(v);
    } else if (a == "--verbose") {
      opts.verbose = true;
    } else if (a == "--help" || a == "-h") {
      fmt::print("usage: usvm demo [--buffer-mib N] [--gpu-threads N] [--verbose]\n");
      return 0;
    } else {
      return Fail(fmt::format("unknown option '{}' for demo", a));
    }
  }
  return usvm::tools::RunDemo(opts);
}

bool WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  if (!out) return false;
  out << text;
  out.close();
  return static_cast<bool>(out);
}

// FILE.json -> FILE.SETTING.json
std::string WithSuffix(const std::string& path, const std::string& setting) {
  const auto dot = path.rfind('.');
  const auto slash = path.rfind('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return path + "." + setting;
  return path.substr(0, dot) + "." + setting + path.substr(dot);
}

struct RunArgs {
  std::string file;
  uint64_t seed = 0;
  bool seed_set = false;
  std::vector<std::string> sets;
  std::string json, trace, report, compare;
  bool quiet = false;
  bool no_verify = false;
  std::string corrupt;  // tests: PHASE:BUFFER:OFFSET
};

int Run(const RunArgs& a) {
  using namespace usvm::sim;
  auto parsed = a.file.empty() ? ParseScenarioString(DefaultScenarioYaml(), "<default>") : ParseScenarioFile(a.file);
  if (!parsed) return Fail(parsed.error().ToString());
  Scenario s = std::move(*parsed);
  if (a.seed_set) s.seed = a.seed;
  if (a.no_verify) s.verify = false;
  for (const std::string& kv : a.sets)
    if (auto r = ApplyOverride(s, kv); !r) return Fail(r.error().ToString());

  // The settings to run: one (the scenario as given), or --compare's.
  std::vector<std::pair<std::string, Scenario>> runs;
  if (a.compare.empty()) {
    runs.emplace_back("", s);
  } else {
    std::string names = a.compare;
    size_t pos = 0;
    while (pos <= names.size()) {
      const size_t comma = names.find(',', pos);
      const std::string name = names.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
      pos = comma == std::string::npos ? names.size() + 1 : comma + 1;
      if (name.empty()) return Fail("--compare: empty setting name");
      auto it = s.settings.find(name);
      if (it == s.settings.end()) {
        std::string known;
        for (const auto& [k, v] : s.settings) known += (known.empty() ? "" : ", ") + k;
        return Fail(fmt::format("--compare: no setting '{}' in the scenario (settings: {})", name,
                                known.empty() ? "none" : known));
      }
      Scenario v = s;
      for (const auto& [k, val] : it->second)
        if (auto r = ApplyOverride(v, k, val); !r) return Fail(r.error().ToString());
      runs.emplace_back(name, std::move(v));
    }
    if (runs.size() < 2) return Fail("--compare needs at least two settings (A,B)");
  }

  std::vector<RunResult> results;
  for (auto& [name, sc] : runs) {
    RunOptions o;
    if (!a.corrupt.empty()) {
      const auto c1 = a.corrupt.find(':'), c2 = a.corrupt.rfind(':');
      uint64_t phase = 0, off = 0;
      if (c1 == c2 || !ParseU64(a.corrupt.substr(0, c1), &phase) || !ParseU64(a.corrupt.substr(c2 + 1), &off))
        return Fail("--corrupt-reference needs PHASE:BUFFER:OFFSET");
      o.corrupt_after_phase = static_cast<int>(phase);
      o.corrupt_buffer = a.corrupt.substr(c1 + 1, c2 - c1 - 1);
      o.corrupt_offset = off;
    }
    o.progress = !a.quiet && isatty(STDOUT_FILENO) && isatty(STDERR_FILENO);
    if (!a.trace.empty()) o.trace_path = name.empty() ? a.trace : WithSuffix(a.trace, name);
    if (!a.report.empty()) o.report_path = name.empty() ? a.report : WithSuffix(a.report, name);
    auto r = RunScenario(sc, o);
    if (!r) return Fail(fmt::format("run{} failed: {}", name.empty() ? "" : " of " + name, r.error()), kExitMismatch);
    r->metrics.setting = name;
    results.push_back(std::move(*r));
  }
  bool mismatch = false;
  for (const RunResult& r : results) mismatch |= r.mismatch.has_value();
  if (!a.json.empty()) {
    std::string text;
    if (results.size() == 1) {
      text = MetricsJson(results[0].metrics, results[0].mismatch ? &*results[0].mismatch : nullptr);
    } else {
      std::vector<const Metrics*> ms;
      std::vector<const Mismatch*> mm;
      for (const RunResult& r : results) {
        ms.push_back(&r.metrics);
        mm.push_back(r.mismatch ? &*r.mismatch : nullptr);
      }
      text = MetricsJsonArray(ms, mm);
    }
    if (!WriteFile(a.json, text)) return Fail("cannot write " + a.json, kExitBadInput);
  }
  if (!a.quiet) {
    if (results.size() == 1) {
      fmt::print("{}", SummaryTable(results[0]));
    } else {
      std::vector<const RunResult*> rs;
      for (const RunResult& r : results) rs.push_back(&r);
      fmt::print("{}", CompareTable(rs));
    }
  }
  for (const RunResult& r : results)
    if (r.mismatch)
      fmt::print(stderr, "usvm: {}{}\n", r.metrics.setting.empty() ? "" : r.metrics.setting + ": ",
                 r.mismatch->ToString());
  return mismatch ? kExitMismatch : 0;
}


struct FuzzArgs {
  uint64_t seed = 1;
  uint64_t ops = 0;
  double time_s = 0;
  uint32_t gpus = 2;
  uint32_t threads = 1;
  double inject = 0;
  std::vector<std::string> inject_sites;
  uint32_t check_every = 200;
  std::string repro = "";
  bool no_shrink = false;
  double shrink_time = 60;
  bool racer = false;
  std::string watch;
};

// `usvm fuzz`: random programs against the reference model (docs/fuzz.md).
int Fuzz(const FuzzArgs& a) {
  usvm::fuzz::FuzzConfig c;
  c.seed = a.seed;
  c.ops = a.ops;
  c.time_s = a.time_s;
  if (c.ops == 0 && c.time_s == 0) c.ops = 10000;
  c.gpus = a.gpus;
  c.threads = a.threads;
  c.inject = a.inject;
  c.inject_sites = a.inject_sites;
  c.check_every = a.check_every;
  c.shrink = !a.no_shrink;
  c.shrink_time_s = a.shrink_time;
  c.racer = a.racer;
  if (!a.watch.empty()) {
    char* end = nullptr;
    c.watch_va = std::strtoull(a.watch.c_str(), &end, 0);
    if (!end || *end || c.watch_va == 0) return Fail(fmt::format("fuzz: --watch: not an address: {}", a.watch));
  }
  if (c.slots < c.threads) c.slots = c.threads;
  auto r = usvm::fuzz::RunFuzz(c);
  if (!r) return Fail(fmt::format("fuzz: {}", r.error().ToString()));
  const double rate = r->seconds > 0 ? r->ops_done / r->seconds : 0;
  fmt::print("fuzz: seed {} gpus {} threads {} inject {}: {} ops in {:.2f} s ({:.0f} ops/s), {} skipped, {} pages checked, "
             "{} mismatches\n",
             c.seed, c.gpus, c.threads, c.inject, r->ops_done, r->seconds, rate, r->ops_skipped, r->checks, r->mismatches);
  if (c.racer) fmt::print("racer: {} data-preserving invalidations beside the workers\n", r->racer_ops);
  if (r->atomic_no_vram) fmt::print("GPU atomics refused for want of device memory (EACCES, allowed): {}\n", r->atomic_no_vram);
  if (c.inject > 0) {
    fmt::print("injected failures reported by operations: {}\n", r->injected_failures);
    for (const auto& [site, n] : r->injected_by_site) fmt::print("  site {}: {} failures\n", site, n);
    for (const auto& [what, n] : r->injected_errors) fmt::print("  {}: {}\n", what, n);
  }
  if (!r->mismatches) return 0;
  fmt::print(stderr, "usvm: fuzz mismatch: {}\n", r->failure);
  if (!r->shrunk.empty()) {
    fmt::print(stderr, "shrunk from {} to {} ops; the shrunk list reports: {}\n", r->failing_ops.size(), r->shrunk.size(),
               r->shrunk_failure);
    if (!r->repro_yaml.empty()) {
      const std::string path = a.repro.empty() ? fmt::format("fuzz-repro-seed{}.yaml", c.seed) : a.repro;
      if (WriteFile(path, r->repro_yaml)) fmt::print(stderr, "reproducer: {} (replay: usvm run {})\n", path, path);
      else fmt::print(stderr, "cannot write the reproducer to {}\n", path);
    } else {
      fmt::print(stderr, "no scenario reproducer: {}; the ops:\n", r->repro_note);
      for (const auto& op : r->shrunk) fmt::print(stderr, "  {}\n", usvm::fuzz::OpToString(op));
    }
  } else if (!r->repro_note.empty()) {
    fmt::print(stderr, "not shrunk: {}; the failing thread's last ops:\n", r->repro_note);
    const size_t n = r->failing_ops.size(), from = n > 40 ? n - 40 : 0;
    for (size_t i = from; i < n; ++i) fmt::print(stderr, "  #{} {}\n", i, usvm::fuzz::OpToString(r->failing_ops[i]));
  }
  return kExitMismatch;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "demo") == 0) return Demo(argc, argv);

  CLI::App app{"usvm: a user-space GPU shared-virtual-memory stack (HMM, interval notifiers, gpusvm,\n"
               "pagemap, an xe-like driver) on simulated GPUs with real bytes"};
  app.set_version_flag("--version", std::string("usvm ") + USVM_VERSION);
  app.require_subcommand(1);
  app.footer(
      "exit codes: 0 ok, 1 data mismatch (or a run that could not finish), 2 bad input\n"
      "`usvm demo --help`: the address-space demonstration");

  RunArgs ra;
  CLI::App* run = app.add_subcommand("run", "run a scenario (the built-in default without a file) and print a summary");
  run->add_option("scenario", ra.file, "scenario YAML file (docs/scenarios.md)");
  run->add_option("--seed", ra.seed, "override the scenario's seed")->each([&](const std::string&) { ra.seed_set = true; });
  run->add_option("--set", ra.sets,
                  "override a field, key=value (seed, verify, machine.gpus, machine.vram, framework.invalidation, "
                  "framework.placement, buffers.NAME.size, ...); repeatable")
      ->allow_extra_args(false)
      ->take_all();
  run->add_option("--json", ra.json, "write the metrics as JSON to FILE");
  run->add_option("--trace", ra.trace, "write a Chrome/Perfetto trace-event JSON to FILE (ui.perfetto.dev)");
  run->add_option("--report", ra.report,
                  "write a self-contained HTML report (residency, fault latency, bytes moved, hottest ranges) to FILE");
  run->add_option("--compare", ra.compare,
                  "run the same scenario and seed under settings A,B,... (the scenario's `settings:`) side by side");
  run->add_flag("--quiet,-q", ra.quiet, "print nothing but errors");
  run->add_flag("--no-verify", ra.no_verify, "skip the reference checks");
  // Hidden (no group): flips a byte of the reference after a phase, so the
  // tests can see a mismatch end to end.
  run->add_option("--corrupt-reference", ra.corrupt, "testing: PHASE:BUFFER:OFFSET")->group("");

  std::string vfile;
  CLI::App* validate = app.add_subcommand("validate", "check a scenario file; prints 'ok' or the first error");
  validate->add_option("file", vfile, "scenario YAML file")->required();
  app.add_subcommand("demo", "the address-space demonstration (usvm demo --help)");

  FuzzArgs fa;
  CLI::App* fuzz = app.add_subcommand("fuzz", "random programs over the whole stack checked against a reference model");
  fuzz->add_option("--seed", fa.seed, "the seed (the op list depends only on it with one thread)");
  fuzz->add_option("--ops", fa.ops, "operations to run, over all threads (default 10000 without --time)");
  fuzz->add_option("--time", fa.time_s, "stop after T seconds")->check(CLI::Range(0.0, 1e7));
  fuzz->add_option("--gpus", fa.gpus, "GPUs attached to the address space")->check(CLI::Range(1, 8));
  fuzz->add_option("--threads", fa.threads, "threads issuing operations, each on its own slots")->check(CLI::Range(1, 16));
  fuzz->add_option("--inject", fa.inject, "probability of an injected failure per call of each Env site")
      ->check(CLI::Range(0.0, 1.0));
  fuzz->add_option("--inject-site", fa.inject_sites, "arm only this Env site (repeatable; docs/fuzz.md lists them)");
  fuzz->add_option("--check-every", fa.check_every, "compare every mapped byte every N ops per thread (0: at the end)");
  fuzz->add_option("--repro", fa.repro, "where to write the reproducer scenario (default fuzz-repro-seedS.yaml)");
  fuzz->add_option("--shrink-time", fa.shrink_time, "seconds the shrinker may take")->check(CLI::Range(0.0, 1e6));
  fuzz->add_flag("--no-shrink", fa.no_shrink, "report the failing op without shrinking");
  fuzz->add_option("--watch", fa.watch, "print every change of the page at this address (model, CPU and GPU views)");
  fuzz->add_flag("--racer", fa.racer,
                 "a thread beside the workers that migrates, evicts, reads and forks at random (docs/fuzz.md)");

  if (argc >= 2 && argv[1][0] != '-' && std::strcmp(argv[1], "run") != 0 && std::strcmp(argv[1], "validate") != 0 &&
      std::strcmp(argv[1], "fuzz") != 0)
    return Fail(fmt::format("unknown command '{}' (try `usvm --help`)", argv[1]));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string what = e.what();
    if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    return Fail(what + " (try `usvm --help`)");
  }
  if (run->parsed()) return Run(ra);
  if (fuzz->parsed()) return Fuzz(fa);
  if (validate->parsed()) {
    auto s = usvm::sim::ParseScenarioFile(vfile);
    if (!s) return Fail(s.error().ToString());
    fmt::print("{}: ok ({} buffers, {} phases)\n", vfile, s->buffers.size(), s->phases.size());
    return 0;
  }
  return Fail("no command given (try `usvm --help`)");
}
