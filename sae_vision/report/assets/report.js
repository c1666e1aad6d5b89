// sae-vision report: the feature browser. Works from file:// (no fetch): the data of each
// browser is a script, data/browser-<id>.js, added to the page the first time it is shown.
(function () {
  "use strict";
  var R = window.REPORT || { browsers: [] };
  window.REPORT_DATA = window.REPORT_DATA || {};
  var PAGE = R.page_size || 48;
  var state = { browser: null, q: "", sort: "interest", page: 0 };
  var el = function (id) { return document.getElementById(id); };

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmt(v, d) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (v !== 0 && (Math.abs(v) < 1e-2 || Math.abs(v) >= 1e4)) return v.toExponential(d === 0 ? 0 : 1);
    return (+v).toFixed(d === undefined ? 3 : d).replace(/\.?0+$/, "") || "0";
  }

  // ---------------------------------------------------------------- data loading
  function withBrowser(id, done) {
    if (window.REPORT_DATA[id]) { done(window.REPORT_DATA[id]); return; }
    var info = R.browsers.filter(function (b) { return b.id === id; })[0];
    if (!info) { return; }
    var s = document.createElement("script");
    s.src = info.file;
    s.onload = function () { prepare(window.REPORT_DATA[id]); done(window.REPORT_DATA[id]); };
    s.onerror = function () { el("cards").innerHTML = '<p class="empty">could not load ' + esc(info.file) + "</p>"; };
    document.head.appendChild(s);
  }

  // Search text and sort keys, computed once per browser.
  function prepare(B) {
    if (!B || B._ready) return;
    B.units.forEach(function (u) {
      var tags = [(B.kind === "neurons" ? "n" : "f") + u.i, "#" + u.i];
      if (u.cd) tags.push("curve", "curve-detector", "ori" + Math.round(u.o));
      if (u.n_active === 0) tags.push("dead");
      if (u.nb) u.nb.forEach(function (p) { tags.push("n" + p[0]); });
      if (u.fs) u.fs.forEach(function (p) { tags.push("f" + p[0]); });
      if (u.top && u.top.length) tags.push("examples");
      u._tags = " " + tags.join(" ").toLowerCase() + " ";
    });
    B._ready = true;
  }

  function matches(u, tokens) {
    for (var i = 0; i < tokens.length; i++) {
      var t = tokens[i];
      if (/^\d+$/.test(t)) { if (String(u.i) !== t) return false; }
      else if (/^[fn#]\d+$/.test(t) || /^ori\d+$/.test(t)) { if (u._tags.indexOf(" " + t + " ") < 0) return false; }
      else if (u._tags.indexOf(t) < 0) return false;
    }
    return true;
  }

  var SORTS = {
    interest: function (a, b) { return (b.cv || -1) - (a.cv || -1) || (b.top ? b.top.length : 0) - (a.top ? a.top.length : 0) || b.d - a.d; },
    curve: function (a, b) { return (b.cv == null ? -Infinity : b.cv) - (a.cv == null ? -Infinity : a.cv) || a.i - b.i; },
    density_desc: function (a, b) { return b.d - a.d || a.i - b.i; },
    density_asc: function (a, b) { return a.d - b.d || a.i - b.i; },
    max_desc: function (a, b) { return b.mx - a.mx || a.i - b.i; },
    id: function (a, b) { return a.i - b.i; }
  };

  // ---------------------------------------------------------------- rendering
  function thumbs(B, list, label) {
    if (!list || !list.length) return "";
    var h = '<div class="row-label">' + label + '</div><div class="thumbs">';
    list.forEach(function (e) {
      var c = B.crops[e[0]];
      h += '<figure><img class="example' + (c[1] ? " clipped" : "") + '" loading="lazy" src="' +
        esc(B.crop_dir + c[0]) + '" alt="example" title="activation ' + fmt(e[1], 3) +
        (c[1] ? " (receptive field clipped at the image border)" : "") + '"><figcaption>' +
        fmt(e[1], 2) + "</figcaption></figure>";
    });
    return h + "</div>";
  }

  function tuningSvg(B, u) {
    if (!u.tc || !B.angles) return "";
    var w = 190, h = 74, p = 4, xs = B.angles, ys = u.tc;
    var lo = Math.min(0, Math.min.apply(null, ys)), hi = Math.max.apply(null, ys) || 1;
    var pts = ys.map(function (y, i) {
      var x = p + (w - 2 * p) * (xs[i] - xs[0]) / ((xs[xs.length - 1] - xs[0]) || 1);
      return x.toFixed(1) + "," + (h - p - (h - 2 * p) * (y - lo) / ((hi - lo) || 1)).toFixed(1);
    }).join(" ");
    var ox = p + (w - 2 * p) * (u.o - xs[0]) / ((xs[xs.length - 1] - xs[0]) || 1);
    return '<div class="tuning" title="response (σ units) against orientation (deg)"><svg width="' + w +
      '" height="' + (h + 12) + '"><rect x="0" y="0" width="' + w + '" height="' + h +
      '" fill="#fafbfc" stroke="#d9dde4"/><line x1="' + ox.toFixed(1) + '" x2="' + ox.toFixed(1) +
      '" y1="0" y2="' + h + '" stroke="#f3b38a" stroke-dasharray="3,2"/><polyline fill="none" stroke="#c2410c" stroke-width="1.6" points="' +
      pts + '"/><text x="2" y="' + (h + 10) + '" font-size="9" fill="#5d6675">' + xs[0] + '°</text><text x="' + (w - 2) +
      '" y="' + (h + 10) + '" font-size="9" fill="#5d6675" text-anchor="end">' + xs[xs.length - 1] +
      '°</text><text x="' + (w / 2) + '" y="' + (h + 10) + '" font-size="9" fill="#5d6675" text-anchor="middle">tuning, peak ' +
      Math.round(u.o) + "°</text></svg></div>";
  }

  function card(B, u) {
    var neuron = B.kind === "neurons";
    var name = (neuron ? "neuron " : "feature ") + u.i;
    var cls = "card" + (u.cd ? " curve" : "") + (u.n_active === 0 ? " dead" : "");
    var ld = u.d > 0 ? Math.log10(u.d) : null;
    var h = '<div class="' + cls + '" data-unit="' + u.i + '"><h4>' + esc(name);
    if (u.cd) h += ' <span class="badge curve">curve ' + Math.round(u.o) + "°</span>";
    if (u.n_active === 0) h += ' <span class="badge dead">dead</span>';
    h += "</h4>";
    h += '<div class="stats">density ' + fmt(u.d, 2) + (ld !== null ? " (log₁₀ " + ld.toFixed(2) + ")" : "") +
      " · max " + fmt(u.mx, 3) + " · mean active " + fmt(u.mu, 3) +
      (u.cv != null ? " · curve/line " + fmt(u.cv, 2) : "") +
      (u.ps != null ? " · peak " + fmt(u.ps, 2) + "σ" : "") +
      (u.w != null ? " · half-width " + Math.round(u.w) + "°" : "") + "</div>";
    var frac = ld === null ? 0 : Math.max(0, Math.min(1, (ld + 6) / 6));
    h += '<div class="densbar" title="log10 density on a −6..0 scale"><i style="width:' + (100 * frac).toFixed(1) + '%"></i></div>';
    if (u.top && u.top.length) {
      h += thumbs(B, u.top, "top activations") + thumbs(B, u.rnd, "random activating examples");
    } else if (u.n_active > 0) {
      h += '<div class="noex">examples not rendered for this unit (raise report.max_cards)</div>';
    }
    var fv = u.fv ? '<img class="fv" loading="lazy" src="' + esc(B.fv_dir + "u" + u.i + ".png") +
      '" alt="feature visualisation" title="feature visualisation (Lucent)">' : "";
    var tc = tuningSvg(B, u);
    if (fv || tc) h += '<div class="visrow">' + fv + tc + "</div>";
    var chips = "";
    if (u.nb && u.nb.length) {
      chips += u.nb.map(function (p) {
        return '<span class="chip" data-goto="' + esc(B.neuron_browser || "") + '" data-q="n' + p[0] +
          '" title="decoder weight on channel ' + p[0] + '">n' + p[0] + " " + fmt(p[1], 2) + "</span>";
      }).join("");
    }
    if (u.fs && u.fs.length) {
      chips += u.fs.map(function (p) {
        return '<span class="chip" data-goto="' + esc(p[2] || "") + '" data-q="f' + p[0] +
          '" title="mean contribution to this channel">f' + p[0] + " " + fmt(p[1], 2) + "</span>";
      }).join("");
    }
    if (chips) h += '<div class="row-label">' + (neuron ? "features writing to it" : "top neurons of its decoder atom") +
      '</div><div class="chips">' + chips + "</div>";
    return h + "</div>";
  }

  function pager(n) {
    var pages = Math.max(1, Math.ceil(n / PAGE)), p = state.page, h = "";
    h += '<button data-page="' + (p - 1) + '"' + (p === 0 ? " disabled" : "") + ">‹</button>";
    for (var i = 0; i < pages; i++) {
      if (pages > 12 && i > 1 && i < pages - 2 && Math.abs(i - p) > 2) {
        if (i === 2 || i === pages - 3) h += "<span>…</span>";
        continue;
      }
      h += '<button data-page="' + i + '"' + (i === p ? ' class="on"' : "") + ">" + (i + 1) + "</button>";
    }
    h += '<button data-page="' + (p + 1) + '"' + (p >= pages - 1 ? " disabled" : "") + ">›</button>";
    return h;
  }

  function render() {
    var id = state.browser;
    withBrowser(id, function (B) {
      prepare(B);
      var tokens = state.q.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = B.units.filter(function (u) { return matches(u, tokens); });
      shown.sort(SORTS[state.sort] || SORTS.interest);
      var pages = Math.max(1, Math.ceil(shown.length / PAGE));
      if (state.page >= pages) state.page = pages - 1;
      if (state.page < 0) state.page = 0;
      var slice = shown.slice(state.page * PAGE, (state.page + 1) * PAGE);
      el("count").textContent = shown.length + " of " + B.units.length + " " +
        (B.kind === "neurons" ? "neurons" : "features") + " · layer " + B.layer +
        (B.n_vectors ? " · examples from " + B.n_vectors.toLocaleString() + " vectors" : "");
      el("cards").innerHTML = slice.length ? slice.map(function (u) { return card(B, u); }).join("")
        : '<p class="empty">no unit matches “' + esc(state.q) + "”</p>";
      el("pager-top").innerHTML = el("pager-bottom").innerHTML = pager(shown.length);
      writeHash();
    });
  }

  // ---------------------------------------------------------------- state <-> URL hash
  function writeHash() {
    var h = "#b=" + encodeURIComponent(state.browser) + "&q=" + encodeURIComponent(state.q) +
      "&s=" + state.sort + "&p=" + state.page;
    if (location.hash !== h && history.replaceState) history.replaceState(null, "", h);
  }
  function readHash() {
    var m = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("="); if (i > 0) m[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1));
    });
    if (m.b && R.browsers.some(function (b) { return b.id === m.b; })) state.browser = m.b;
    if (m.q !== undefined) state.q = m.q;
    if (m.s && SORTS[m.s]) state.sort = m.s;
    if (m.p) state.page = parseInt(m.p, 10) || 0;
  }

  function go(browser, q) {
    if (browser) state.browser = browser;
    state.q = q || ""; state.page = 0;
    el("browser-select").value = state.browser;
    el("search").value = state.q;
    render();
    el("browser").scrollIntoView();
  }
  window.reportGo = go;

  function init() {
    if (!el("browser") || !R.browsers.length) return;
    state.browser = R.browsers[0].id;
    readHash();
    var sel = el("browser-select");
    sel.innerHTML = R.browsers.map(function (b) {
      return '<option value="' + esc(b.id) + '">' + esc(b.label) + "</option>";
    }).join("");
    sel.value = state.browser;
    el("search").value = state.q;
    el("sort").value = state.sort;
    sel.addEventListener("change", function () { state.browser = sel.value; state.page = 0; render(); });
    var timer = null;
    el("search").addEventListener("input", function (e) {
      clearTimeout(timer);
      timer = setTimeout(function () { state.q = e.target.value; state.page = 0; render(); }, 120);
    });
    el("sort").addEventListener("change", function (e) { state.sort = e.target.value; state.page = 0; render(); });
    document.addEventListener("click", function (e) {
      var t = e.target.closest ? e.target.closest("[data-page],[data-q]") : null;
      if (!t) return;
      if (t.hasAttribute("data-page")) { state.page = parseInt(t.getAttribute("data-page"), 10); render(); return; }
      go(t.getAttribute("data-goto") || state.browser, t.getAttribute("data-q"));
    });
    render();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
