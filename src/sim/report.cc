// The HTML report (report.h): inline SVG charts drawn here, so the page
// needs neither scripts nor the network.
#include "usvm/sim/report.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>

namespace usvm::sim {

namespace {

std::string Esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '&': o += "&amp;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
constexpr int kW = 640, kH = 260, kL = 70, kR = 20, kT = 20, kB = 40;

struct Series {
  std::string name;
  std::string color;
  std::vector<std::pair<double, double>> pts;  // (x, y)
};

// A line chart (steps: each value holds until the next point).
std::string LineChart(const std::string& id, const std::string& title, const std::string& xlabel,
                      const std::string& ylabel, const std::vector<Series>& series, double ymax_hint) {
  double xmax = 1e-9, ymax = ymax_hint;
  for (const Series& s : series)
    for (auto [x, y] : s.pts) xmax = std::max(xmax, x), ymax = std::max(ymax, y);
  if (ymax <= 0) ymax = 1;
  auto X = [&](double x) { return kL + (kW - kL - kR) * x / xmax; };
  auto Y = [&](double y) { return kH - kB - (kH - kT - kB) * y / ymax; };
  std::string o = fmt::format("<figure><figcaption>{}</figcaption><svg id=\"{}\" class=\"chart\" width=\"{}\" height=\"{}\" "
                              "viewBox=\"0 0 {} {}\" xmlns=\"http://www.w3.org/2000/svg\">\n",
                              Esc(title), id, kW, kH, kW, kH);
  o += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#ccc\"/>\n", kL, kT,
                   kW - kL - kR, kH - kT - kB);
  for (int i = 0; i <= 4; ++i) {
    const double y = ymax * i / 4;
    o += fmt::format("<line x1=\"{}\" x2=\"{}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#e0e0e0\"/>"
                     "<text x=\"{}\" y=\"{:.1f}\" font-size=\"10\" text-anchor=\"end\">{}</text>\n",
                     kL, kW - kR, Y(y), Y(y), kL - 4, Y(y) + 3, Esc(FormatBytes(uint64_t(y))));
  }
  for (int i = 0; i <= 4; ++i) {
    const double x = xmax * i / 4;
    o += fmt::format("<text x=\"{:.1f}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{:.1f}</text>\n", X(x),
                     kH - kB + 14, x);
  }
  o += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n", (kL + kW - kR) / 2,
                   kH - 6, Esc(xlabel));
  o += fmt::format("<text x=\"12\" y=\"{}\" font-size=\"11\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">{}</text>\n",
                   kH / 2, kH / 2, Esc(ylabel));
  int li = 0;
  for (const Series& s : series) {
    std::string pts;
    double last_y = 0;
    bool first = true;
    for (auto [x, y] : s.pts) {
      if (!first) pts += fmt::format("{:.1f},{:.1f} ", X(x), Y(last_y));
      pts += fmt::format("{:.1f},{:.1f} ", X(x), Y(y));
      last_y = y;
      first = false;
    }
    o += fmt::format("<polyline class=\"series\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
                     s.color, pts);
    o += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" "
                     "font-size=\"11\">{}</text>\n",
                     kL + 10 + li * 120, kT + 6, s.color, kL + 24 + li * 120, kT + 15, Esc(s.name));
    ++li;
  }
  o += "</svg></figure>\n";
  return o;
}

std::string Histogram(const std::string& id, const std::string& title, const std::vector<uint64_t>& values_ns) {
  // log2 buckets of microseconds: [<1us, 1-2, 2-4, ...].
  std::vector<uint64_t> buckets(24, 0);
  for (uint64_t v : values_ns) {
    const uint64_t us = v / 1000;
    size_t b = us == 0 ? 0 : std::min<size_t>(buckets.size() - 1, 1 + size_t(std::log2(double(us))));
    ++buckets[b];
  }
  size_t last = 0;
  for (size_t i = 0; i < buckets.size(); ++i)
    if (buckets[i]) last = i;
  const size_t n = std::max<size_t>(last + 1, 4);
  const uint64_t ymax = std::max<uint64_t>(1, *std::max_element(buckets.begin(), buckets.end()));
  const double bw = double(kW - kL - kR) / n;
  std::string o = fmt::format("<figure><figcaption>{}</figcaption><svg id=\"{}\" class=\"chart\" width=\"{}\" height=\"{}\" "
                              "viewBox=\"0 0 {} {}\" xmlns=\"http://www.w3.org/2000/svg\">\n",
                              Esc(title), id, kW, kH, kW, kH);
  o += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#ccc\"/>\n", kL, kT,
                   kW - kL - kR, kH - kT - kB);
  for (size_t i = 0; i < n; ++i) {
    const double h = double(kH - kT - kB) * buckets[i] / ymax;
    o += fmt::format("<rect class=\"bar\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"#1f77b4\">"
                     "<title>{}</title></rect>\n",
                     kL + i * bw + 1, kH - kB - h, bw - 2, h, buckets[i]);
    const std::string label = i == 0 ? "<1" : fmt::format("{}", uint64_t{1} << (i - 1));
    o += fmt::format("<text x=\"{:.1f}\" y=\"{}\" font-size=\"9\" text-anchor=\"middle\">{}</text>\n",
                     kL + i * bw + bw / 2, kH - kB + 12, label);
  }
  for (int i = 0; i <= 4; ++i) {
    const double y = kH - kB - double(kH - kT - kB) * i / 4;
    o += fmt::format("<text x=\"{}\" y=\"{:.1f}\" font-size=\"10\" text-anchor=\"end\">{}</text>\n", kL - 4, y + 3,
                     ymax * i / 4);
  }
  o += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">service latency, us (log2 "
                   "buckets: lower bound)</text>\n",
                   (kL + kW - kR) / 2, kH - 6);
  o += fmt::format("<text x=\"12\" y=\"{}\" font-size=\"11\" transform=\"rotate(-90 12 {})\" "
                   "text-anchor=\"middle\">faults</text>\n",
                   kH / 2, kH / 2);
  o += "</svg></figure>\n";
  return o;
}

}  // namespace

std::string ReportHtml(const ReportData& d) {
  const RunResult& r = *d.result;
  const Metrics& m = r.metrics;
  std::string o =
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\n<title>usvm run: " + Esc(m.scenario) +
      "</title>\n<style>body{font-family:sans-serif;margin:24px;max-width:1400px}"
      "pre{background:#f4f4f4;padding:12px}figure{display:inline-block;margin:8px}"
      "figcaption{font-weight:bold;margin-bottom:4px}table{border-collapse:collapse}"
      "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
      ".bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}</style></head><body>\n";
  o += fmt::format("<h1>usvm run: {}</h1>\n<p>seed {}, {} GPU(s), wall time {:.2f} s. Verification: {}</p>\n",
                   Esc(m.scenario), m.seed, m.gpus, m.wall_s,
                   !m.verify      ? "<span>off</span>"
                   : r.mismatch   ? "<span class=\"bad\">MISMATCH</span>"
                                  : "<span class=\"ok\">ok</span>");
  if (r.mismatch) o += "<p class=\"bad\">" + Esc(r.mismatch->ToString()) + "</p>\n";
  o += "<h2>Summary</h2>\n<pre>" + Esc(SummaryTable(r)) + "</pre>\n<h2>Charts</h2>\n";

  // Residency per GPU.
  std::vector<Series> res(m.gpus);
  for (uint32_t g = 0; g < m.gpus; ++g) res[g] = {fmt::format("GPU {}", g), kColors[g % 8], {}};
  uint64_t vram_total = 0;
  for (const PerGpuMetrics& p : m.per_gpu) vram_total = std::max(vram_total, p.vram_bytes);
  for (const ResidencySample& s : d.residency)
    for (uint32_t g = 0; g < m.gpus && g < s.vram_used.size(); ++g)
      res[g].pts.push_back({double(s.t_ns - d.t0_ns) / 1e6, double(s.vram_used[g])});
  o += LineChart("residency", "VRAM residency over time", "time, ms", "VRAM in use", res, double(vram_total));

  // Fault latency histogram.
  std::vector<uint64_t> lat;
  for (const driver::Event& e : d.events)
    if (e.kind == driver::EventKind::kGpuFault) lat.push_back(e.end_ns - e.begin_ns);
  o += Histogram("fault_latency", fmt::format("GPU fault service latency ({} faults)", lat.size()), lat);

  // Bytes moved over time.
  Series in{"to VRAM", kColors[0], {{0, 0}}}, out{"to RAM", kColors[1], {{0, 0}}};
  uint64_t cin = 0, cout = 0;
  std::vector<const driver::Event*> moves;
  for (const driver::Event& e : d.events)
    if (e.kind == driver::EventKind::kMigrateToVram || e.kind == driver::EventKind::kMigrateToRam) moves.push_back(&e);
  std::sort(moves.begin(), moves.end(), [](auto* a, auto* b) { return a->end_ns < b->end_ns; });
  for (const driver::Event* e : moves) {
    const double t = e->end_ns > d.t0_ns ? double(e->end_ns - d.t0_ns) / 1e6 : 0;
    if (e->kind == driver::EventKind::kMigrateToVram) in.pts.push_back({t, double(cin += e->len)});
    else out.pts.push_back({t, double(cout += e->len)});
  }
  o += LineChart("bytes_moved", "Bytes moved over time (cumulative)", "time, ms", "bytes", {in, out}, 0);

  // Hottest ranges.
  struct Hot {
    uint64_t to_vram = 0, to_ram = 0, bytes = 0;
    std::map<std::string, uint64_t> why;
    std::map<uint32_t, uint64_t> gpus;
  };
  std::map<uint64_t, Hot> hot;
  for (const driver::Event* e : moves) {
    Hot& h = hot[e->va];
    (e->kind == driver::EventKind::kMigrateToVram ? h.to_vram : h.to_ram)++;
    h.bytes += e->len;
    ++h.why[std::string(e->kind == driver::EventKind::kMigrateToVram ? "to VRAM: " : "to RAM: ") +
            driver::MigrateReasonName(e->reason) + (e->policy ? std::string(" (") + e->policy + ")" : "")];
    ++h.gpus[e->gpu];
  }
  std::vector<std::pair<uint64_t, const Hot*>> order;
  for (const auto& [va, h] : hot) order.push_back({va, &h});
  std::sort(order.begin(), order.end(), [](auto& a, auto& b) { return a.second->bytes > b.second->bytes; });
  o += "<h2>Hottest ranges</h2>\n<table id=\"hot\"><tr><th>range start</th><th>buffer + offset</th><th>moves to "
       "VRAM</th><th>moves to RAM</th><th>bytes moved</th><th>GPUs</th><th>why</th></tr>\n";
  for (size_t i = 0; i < order.size() && i < 25; ++i) {
    const auto& [va, h] = order[i];
    std::string where = va ? "?" : "(unknown)";
    for (const BufferExtent& b : d.buffers)
      if (va >= b.va && va < b.va + b.size) where = fmt::format("{} + {:#x}", b.name, va - b.va);
    std::string why, gpus;
    for (const auto& [k, v] : h->why) why += fmt::format("{}{} &times;{}", why.empty() ? "" : "<br>", Esc(k), v);
    for (const auto& [g, v] : h->gpus) gpus += fmt::format("{}{}", gpus.empty() ? "" : ", ", g);
    o += fmt::format("<tr><td><code>{:#x}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                     va, Esc(where), h->to_vram, h->to_ram, Esc(FormatBytes(h->bytes)), gpus, why);
  }
  o += "</table>\n";
  // Thrashing policy decisions, per block.
  struct Decisions {
    uint64_t throttles = 0, pins = 0, nap_ns = 0;
    double first_ms = -1;
    std::string policy;
  };
  std::map<uint64_t, Decisions> dec;
  for (const driver::Event& e : d.events) {
    if (e.kind != driver::EventKind::kThrottle && e.kind != driver::EventKind::kPin) continue;
    Decisions& x = dec[e.va & ~((uint64_t{1} << 21) - 1)];
    if (e.kind == driver::EventKind::kThrottle) ++x.throttles, x.nap_ns += e.end_ns - e.begin_ns;
    else ++x.pins;
    const double t = e.begin_ns > d.t0_ns ? double(e.begin_ns - d.t0_ns) / 1e6 : 0;
    if (x.first_ms < 0) x.first_ms = t;
    if (e.policy) x.policy = e.policy;
  }
  if (!dec.empty()) {
    o += "<h2>Thrashing decisions</h2>\n<table id=\"thrashing\"><tr><th>block</th><th>buffer + offset</th><th>policy</th>"
         "<th>throttles</th><th>nap time</th><th>pins</th><th>first at</th></tr>\n";
    for (const auto& [va, x] : dec) {
      std::string where = "?";
      for (const BufferExtent& b : d.buffers)
        if (va >= b.va && va < b.va + b.size) where = fmt::format("{} + {:#x}", b.name, va - b.va);
      o += fmt::format("<tr><td><code>{:#x}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2f} ms</td></tr>\n",
                       va, Esc(where), Esc(x.policy), x.throttles, fmt::format("{:.1f} us", double(x.nap_ns) / 1e3), x.pins, x.first_ms);
    }
    o += "</table>\n";
  }
  // Access counter notifications, per region.
  struct HotRegion {
    uint64_t len = 0, notifications = 0, migrated = 0;
    uint32_t gpu = 0;
    std::string policy;
  };
  std::map<uint64_t, HotRegion> ac_hot;
  for (const driver::Event& e : d.events) {
    if (e.kind != driver::EventKind::kAccessCounter) continue;
    HotRegion& x = ac_hot[e.va];
    x.len = e.len;
    x.gpu = e.gpu;
    ++x.notifications;
    x.migrated += e.detail;
    if (e.policy) x.policy = e.policy;
  }
  if (!ac_hot.empty()) {
    o += "<h2>Access counter notifications</h2>\n<table id=\"access_counters\"><tr><th>region</th><th>buffer + offset</th>"
         "<th>GPU</th><th>policy</th><th>notifications</th><th>migrated</th></tr>\n";
    for (const auto& [va, x] : ac_hot) {
      std::string where = "?";
      for (const BufferExtent& b : d.buffers)
        if (va >= b.va && va < b.va + b.size) where = fmt::format("{} + {:#x}", b.name, va - b.va);
      o += fmt::format("<tr><td><code>{:#x}</code> ({})</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                       va, Esc(FormatBytes(x.len)), Esc(where), x.gpu, Esc(x.policy), x.notifications, x.migrated);
    }
    o += "</table>\n";
  }
  if (!m.runtime_faults.empty()) {
    o += "<h2>Runtime faults</h2>\n<table><tr><th>step</th><th>error</th><th>expected</th></tr>\n";
    for (const RuntimeFault& f : m.runtime_faults)
      o += fmt::format("<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n", Esc(f.step), Esc(f.error), f.expected ? "yes" : "<b>no</b>");
    o += "</table>\n";
  }
  o += "</body></html>\n";
  return o;
}

bool WriteReport(const std::string& path, const ReportData& d, std::string* err) {
  std::ofstream out(path);
  if (out) out << ReportHtml(d);
  out.close();
  if (!out) {
    *err = "cannot write the report to " + path;
    return false;
  }
  return true;
}

}  // namespace usvm::sim
