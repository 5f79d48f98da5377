// MedianReporter: Google Benchmark's console reporter that also keeps each
// benchmark's counters from its median run (or its only run, without
// repetitions), so a program can print a comparison table at the end.
// Subclasses override Finalize and read results with Get.
#ifndef USVM_BENCH_MEDIAN_REPORTER_H_
#define USVM_BENCH_MEDIAN_REPORTER_H_

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace usvm::bench {

// One line of a ratio table: benchmark `sim` against its baseline `base`
// on `counter` (both by function name), with the minimum ratio that meets
// the goal (0: none).
struct RatioPair {
  std::string label, sim, base, counter = "bytes_per_second";
  double goal = 0;
};

// False when --benchmark_format asks for something else than the console
// (then the plain library reporter is used and no table is printed).
inline bool ConsoleFormat(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--benchmark_format=", 19) == 0 &&
        std::strcmp(argv[i] + 19, "console") != 0)
      return false;
  return true;
}

class MedianReporter : public benchmark::ConsoleReporter {
 public:
  // Colour only on a terminal, as the library's own console reporter does.
  MedianReporter() : ConsoleReporter(isatty(STDOUT_FILENO) ? OO_Defaults : OO_Tabular) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const bool median = r.run_type == Run::RT_Aggregate && r.aggregate_name == "median";
      if (r.run_type == Run::RT_Aggregate && !median) continue;
      Entry& e = results_[r.run_name.function_name];
      if (e.from_median && !median) continue;
      e.from_median = median;
      e.counters.clear();
      for (const auto& [k, c] : r.counters) e.counters[k] = c.value;
    }
    ConsoleReporter::ReportRuns(runs);
  }

 protected:
  // A counter of a benchmark (by its function name), or -1 if absent.
  double Get(const std::string& name, const std::string& counter) const {
    auto it = results_.find(name);
    if (it == results_.end()) return -1;
    auto c = it->second.counters.find(counter);
    return c == it->second.counters.end() ? -1 : c->second;
  }
  // Prints `title` and one line per pair whose two benchmarks both ran:
  // the two values, their ratio, and whether the goal is met. `unit`
  // names counters other than bytes_per_second.
  void PrintRatios(const char* title, const std::vector<RatioPair>& pairs,
                   const char* unit = "/s") {
    std::ostream& out = GetOutputStream();
    out << "\n" << title << "\n";
    char line[256];
    for (const RatioPair& p : pairs) {
      const double s = Get(p.sim, p.counter), b = Get(p.base, p.counter);
      if (s <= 0 || b <= 0) continue;
      const double ratio = s / b;
      std::snprintf(line, sizeof line, "  %-34s %12s vs %12s  ratio %6.3f%s\n", p.label.c_str(),
                    Human(s, p.counter, unit).c_str(), Human(b, p.counter, unit).c_str(), ratio,
                    p.goal <= 0 ? "" : (ratio >= p.goal ? "  (goal met)" : "  (GOAL MISSED)"));
      out << line;
    }
  }
  bool AnyMedian() const {
    for (const auto& [n, e] : results_)
      if (e.from_median) return true;
    return false;
  }
  // 12.3 GB/s, 4.56 M/s: bytes_per_second counters get "B/s", others
  // `unit`.
  static std::string Human(double v, const std::string& counter, const char* unit) {
    if (counter == "bytes_per_second") unit = "B/s";
    const char* prefix = "";
    if (v >= 1e9) v /= 1e9, prefix = "G";
    else if (v >= 1e6) v /= 1e6, prefix = "M";
    else if (v >= 1e3) v /= 1e3, prefix = "k";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3g %s%s", v, prefix, unit);
    return buf;
  }

 private:
  struct Entry {
    bool from_median = false;
    std::map<std::string, double> counters;
  };
  std::map<std::string, Entry> results_;
};

}  // namespace usvm::bench

#endif  // USVM_BENCH_MEDIAN_REPORTER_H_
