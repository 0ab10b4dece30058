/*
 * Traffic charts for the TEI Manager admin, drawn with uPlot (vendor/uplot, MIT).
 *
 * Every <div class="tei-charts" data-url="…" data-refresh="ms"> is filled from its URL, a
 * JSON document {window, step, x: [epoch seconds], charts: [{id, title, unit, series:
 * [{label, values}]}]} (telemetry/series.py), and redrawn every data-refresh milliseconds
 * while the page is visible. A null value is a gap. Each chart's element says how many
 * values it holds (data-points) and how many are above zero (data-nonzero).
 */
(function () {
    "use strict";

    const HEIGHT = 150;
    const PALETTE = ["#2f6fb3", "#c53030", "#2f855a", "#b7791f", "#6b46c1", "#718096", "#d53f8c", "#319795"];
    const STATUS_COLOURS = {
        pending: "#6c7a89",
        starting: "#b7791f",
        running: "#2f855a",
        stopping: "#c05621",
        stopped: "#718096",
        failed: "#c53030",
    };

    function start() {
        if (typeof uPlot === "undefined") {
            return;
        }
        document.querySelectorAll(".tei-charts[data-url]").forEach(function (container) {
            const panel = new Panel(container);
            panel.refresh();
        });
    }

    function Panel(container) {
        this.container = container;
        this.charts = {};
        this.refreshMs = Number(container.dataset.refresh || 10000);
        const panel = this;
        window.addEventListener("resize", function () {
            Object.values(panel.charts).forEach(function (entry) {
                if (entry.plot) {
                    entry.plot.setSize({ width: widthOf(entry.element), height: HEIGHT });
                }
            });
        });
    }

    function widthOf(element) {
        return Math.max(200, element.clientWidth - 4);
    }

    Panel.prototype.refresh = async function () {
        const panel = this;
        if (!document.hidden) {
            try {
                const response = await fetch(panel.container.dataset.url, {
                    headers: { Accept: "application/json" },
                    credentials: "same-origin",
                });
                if (!response.ok) {
                    throw new Error("answered " + response.status);
                }
                panel.draw(await response.json());
                delete panel.container.dataset.error;
                panel.container.dataset.refreshed = String(Date.now());
            } catch (error) {
                panel.container.dataset.error = String(error.message || error);
            }
        }
        window.setTimeout(function () { panel.refresh(); }, panel.refreshMs);
    };

    Panel.prototype.draw = function (doc) {
        const empty = this.container.querySelector(".tei-charts__empty");
        if (empty) {
            empty.remove();
        }
        const seen = {};
        doc.charts.forEach(function (chart) {
            seen[chart.id] = true;
            this.drawChart(doc, chart);
        }, this);
        Object.keys(this.charts).forEach(function (id) {
            if (!seen[id]) {
                this.charts[id].element.remove();
                delete this.charts[id];
            }
        }, this);
    };

    Panel.prototype.drawChart = function (doc, chart) {
        let entry = this.charts[chart.id];
        const shape = chart.series.map(function (s) { return s.label; }).join("\u0000");
        if (!entry) {
            const element = document.createElement("div");
            element.className = "tei-chart";
            element.dataset.chart = chart.id;
            const title = document.createElement("h4");
            title.className = "tei-chart__title";
            title.textContent = chart.title;
            const body = document.createElement("div");
            element.append(title, body);
            this.container.append(element);
            entry = this.charts[chart.id] = { element: element, body: body, plot: null, shape: null };
        }
        const values = chart.series.map(function (s) { return s.values; });
        const flat = [].concat.apply([], values);
        entry.element.dataset.points = String(flat.filter(function (v) { return v !== null; }).length);
        entry.element.dataset.nonzero = String(flat.filter(function (v) { return v !== null && v > 0; }).length);
        if (!chart.series.length) {
            if (entry.plot) {
                entry.plot.destroy();
                entry.plot = null;
            }
            entry.body.innerHTML = "";
            const note = document.createElement("p");
            note.className = "tei-quiet tei-chart__none";
            note.textContent = chart.id === "gpu-memory" ? "No GPU samples (no NVIDIA GPU, or no worker sampling it)." : "No samples yet.";
            entry.body.append(note);
            entry.shape = null;
            return;
        }
        const data = [doc.x].concat(values);
        if (entry.plot && entry.shape === shape) {
            entry.plot.setData(data);
            return;
        }
        if (entry.plot) {
            entry.plot.destroy();
        }
        entry.body.innerHTML = "";
        entry.shape = shape;
        entry.plot = new uPlot(options(chart, widthOf(entry.element)), data, entry.body);
    };

    function options(chart, width) {
        const unit = chart.unit;
        return {
            width: width,
            height: HEIGHT,
            legend: { show: true, live: true },
            cursor: { drag: { x: false, y: false } },
            scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(max || 0, 1) * 1.1]; } } },
            axes: [
                { stroke: "#888", grid: { stroke: "rgba(128,128,128,0.15)" } },
                {
                    stroke: "#888",
                    grid: { stroke: "rgba(128,128,128,0.15)" },
                    size: 60,
                    values: function (u, ticks, axis, space, increment) {
                        const decimals = Math.max(0, Math.min(3, -Math.floor(Math.log10(increment || 1))));
                        const suffix = unit && unit !== "/s" ? " " + unit : "";
                        return ticks.map(function (v) { return v.toFixed(decimals) + suffix; });
                    },
                },
            ],
            series: [{}].concat(chart.series.map(function (s, index) {
                const colour = STATUS_COLOURS[s.label] || PALETTE[index % PALETTE.length];
                return {
                    label: s.label,
                    stroke: colour,
                    width: 1.5,
                    fill: index === 0 && chart.series.length <= 2 ? colour + "22" : undefined,
                    spanGaps: false,
                    // A value between two gaps is a dot: a line needs two points.
                    points: { show: true, size: 5, filter: isolated },
                    value: function (u, v) { return v === null || v === undefined ? "—" : number(v) + (unit ? " " + unit : ""); },
                };
            })),
        };
    }

    function isolated(u, seriesIndex) {
        const values = u.data[seriesIndex];
        const found = [];
        for (let i = 0; i < values.length; i++) {
            const before = i === 0 ? null : values[i - 1];
            const after = i === values.length - 1 ? null : values[i + 1];
            if (values[i] !== null && before === null && after === null) {
                found.push(i);
            }
        }
        return found;
    }

    function number(v) {
        if (v === null || v === undefined) {
            return "—";
        }
        if (v === 0) {
            return "0";
        }
        const size = Math.abs(v);
        if (size >= 10000) {
            return (v / 1000).toFixed(1) + "k";
        }
        if (size >= 100) {
            return v.toFixed(0);
        }
        if (size >= 1) {
            return v.toFixed(1);
        }
        return v.toFixed(2);
    }

    // Last: the prototype methods above must exist before the first panel refreshes.
    if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start();
    }
})();
