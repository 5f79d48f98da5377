// MedianReporter: Google Benchmark's console reporter that also keeps each
// benchmark's counters from its median run (or its only run, without
// repetitions), so a program can print a comparison table at the end.
// Subclasses override Finalize and read results with Get.
#ifndef USVM_BENCH_MEDIAN_REPORTER_H_
#define USVM_BENCH_MEDIAN_REPORTER_H_

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace usvm::bench {

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
