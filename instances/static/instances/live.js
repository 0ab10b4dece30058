/*
 * Live refresh for the TEI Manager admin, without a page reload.
 *
 * Reads its settings from <div id="tei-live" data-...>:
 *   data-api        the REST list URL (/instances): statuses on the instance list
 *   data-traffic    the admin URL of each instance's current traffic (JSON): its columns
 *   data-instance   one instance's name: its runtime facts on the instance page
 *   data-logs       that instance's log URL (…/logs?start=-100): the log tail
 *   data-dashboard  the admin URL of the index panels (HTML), swapped in whole
 *   data-interval   milliseconds between polls
 * Elements to redraw carry data-instance="<name>" data-field="<field>"; the formats below
 * match instances/templatetags/tei_admin.py.
 */
(function () {
    "use strict";

    if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start();
    }

    function start() {
        const root = document.getElementById("tei-live");
        if (!root) {
            return;
        }
        const settings = root.dataset;
        const interval = Number(settings.interval || 3000);
        const LAST_ERROR_LENGTH = 60;

        function utc(iso) {
            if (!iso) {
                return "—";
            }
            return new Date(iso).toISOString().slice(0, 19).replace("T", " ") + " UTC";
        }

        function uptime(instance) {
            if (instance.status !== "running" || !instance.started_at) {
                return "—";
            }
            let seconds = Math.max(0, Math.floor((Date.now() - Date.parse(instance.started_at)) / 1000));
            const days = Math.floor(seconds / 86400);
            const hours = Math.floor((seconds % 86400) / 3600);
            const minutes = Math.floor((seconds % 3600) / 60);
            seconds = seconds % 60;
            const pad = (n) => String(n).padStart(2, "0");
            if (days) {
                return days + "d " + hours + "h";
            }
            if (hours) {
                return hours + "h " + pad(minutes) + "m";
            }
            if (minutes) {
                return minutes + "m " + pad(seconds) + "s";
            }
            return seconds + "s";
        }

        function shorten(text) {
            const whole = (text || "").trim();
            const line = whole ? whole.split("\n")[0] : "";
            if (line.length <= LAST_ERROR_LENGTH && line === whole) {
                return line;
            }
            return line.slice(0, LAST_ERROR_LENGTH - 1) + "…";
        }

        const formats = {
            status: (i) => i.status,
            desired_state: (i) => i.desired_state,
            pid: (i) => (i.pid === null || i.pid === undefined ? "—" : String(i.pid)),
            restarts: (i) => String(i.restarts),
            health_check_failures: (i) => String(i.health_check_failures),
            uptime: uptime,
            started_at: (i) => utc(i.started_at),
            last_health_check: (i) => utc(i.last_health_check),
            last_error: (i) => (i.last_error ? i.last_error : "—"),
            last_error_short: (i) => shorten(i.last_error) || "—",
        };

        function rate(value) {
            if (value === null || value === undefined) {
                return "—";
            }
            if (value === 0) {
                return "0";
            }
            if (value < 10) {
                return value.toFixed(1);
            }
            if (value < 10000) {
                return value.toFixed(0);
            }
            return (value / 1000).toFixed(1) + "k";
        }

        function milliseconds(value) {
            if (value === null || value === undefined) {
                return "—";
            }
            if (value < 1) {
                return value.toFixed(2) + " ms";
            }
            if (value < 100) {
                return value.toFixed(1) + " ms";
            }
            return value.toFixed(0) + " ms";
        }

        // The traffic columns (instances/admin_traffic.py); "—" without a fresh sample.
        const trafficFormats = {
            calls_per_sec: (t) => rate(t && t.calls_per_sec),
            errors_per_sec: (t) => rate(t && t.errors_per_sec),
            tokens_per_sec: (t) => rate(t && t.tokens_per_sec),
            p50_ms: (t) => milliseconds(t && t.p50_ms),
            p95_ms: (t) => milliseconds(t && t.p95_ms),
            queue_depth: (t) => (t ? String(t.queue_depth) : "—"),
        };

        function redraw(instance) {
            const selector = '[data-instance="' + CSS.escape(instance.name) + '"][data-field]';
            document.querySelectorAll(selector).forEach(function (element) {
                const format = formats[element.dataset.field];
                if (!format) {
                    return;
                }
                const text = format(instance);
                if (element.textContent !== text) {
                    element.textContent = text;
                }
                if (element.dataset.field === "status") {
                    element.className = "tei-badge tei-badge--" + instance.status;
                }
                if (element.dataset.field === "last_error_short") {
                    element.title = instance.last_error || "";
                }
            });
        }

        async function getJson(url) {
            const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
            if (!response.ok) {
                throw new Error(url + " answered " + response.status);
            }
            return response.json();
        }

        async function refreshInstances() {
            if (!settings.api) {
                return;
            }
            if (settings.instance) {
                redraw(await getJson(settings.api + "/" + encodeURIComponent(settings.instance)));
                return;
            }
            if (!document.querySelector("[data-instance]")) {
                return;
            }
            const body = await getJson(settings.api);
            const list = Array.isArray(body) ? body : body.instances || body.results || [];
            list.forEach(redraw);
        }

        async function refreshTraffic() {
            if (!settings.traffic) {
                return;
            }
            const current = (await getJson(settings.traffic)).instances || {};
            document.querySelectorAll("[data-instance][data-field]").forEach(function (element) {
                const format = trafficFormats[element.dataset.field];
                if (!format) {
                    return;
                }
                const text = format(current[element.dataset.instance]);
                if (element.textContent !== text) {
                    element.textContent = text;
                }
            });
        }

        async function refreshLogs() {
            const pre = document.getElementById("tei-log");
            if (!settings.logs || !pre) {
                return;
            }
            const body = await getJson(settings.logs);
            const text = body.lines.join("\n");
            if (pre.textContent !== text) {
                const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 20;
                pre.textContent = text;
                if (atBottom) {
                    pre.scrollTop = pre.scrollHeight;
                }
            }
            const meta = document.getElementById("tei-log-meta");
            if (meta) {
                meta.textContent = body.total_lines
                    ? "Lines " + (body.start + 1) + "–" + body.end + " of " + body.total_lines
                    : "The log is empty.";
            }
        }

        async function refreshDashboard() {
            const panel = document.getElementById("tei-dashboard");
            if (!settings.dashboard || !panel) {
                return;
            }
            const response = await fetch(settings.dashboard, { credentials: "same-origin" });
            if (!response.ok) {
                throw new Error(settings.dashboard + " answered " + response.status);
            }
            panel.innerHTML = await response.text();
        }

        function report(error) {
            const line = document.getElementById("tei-live-status");
            if (!line) {
                return;
            }
            line.classList.toggle("tei-live--error", Boolean(error));
            line.textContent = error
                ? "Live refresh failed (" + error.message + "); retrying."
                : "Live: refreshed " + new Date().toLocaleTimeString() + ".";
        }

        async function tick() {
            if (!document.hidden) {
                try {
                    await Promise.all([
                        refreshInstances(),
                        refreshTraffic(),
                        refreshLogs(),
                        refreshDashboard(),
                    ]);
                    root.dataset.refreshed = String(Date.now());
                    report(null);
                } catch (error) {
                    report(error);
                }
            }
            window.setTimeout(tick, interval);
        }

        const pre = document.getElementById("tei-log");
        if (pre) {
            pre.scrollTop = pre.scrollHeight;
        }
        window.setTimeout(tick, interval);
    }
})();
