'use strict';
// The canary dashboard: renders the snapshots the agent pushes (server-sent events)
// and, when the agent has a token configured, sends controls with that token.

const $ = (sel, el = document) => el.querySelector(sel);
let controls = false;

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function controlForm(name) {
  const form = el('form', { class: 'controls', 'data-service': name });
  const action = el('select', { name: 'action', 'aria-label': 'action' });
  for (const a of ['pause', 'resume', 'rollback', 'approve', 'promote', 'promote-full', 'set-weight']) {
    action.append(el('option', { value: a }, a));
  }
  form.append(
    action,
    el('input', { name: 'weight', type: 'number', min: '0', max: '100', step: '0.01', placeholder: 'weight %', 'aria-label': 'weight' }),
    el('input', { name: 'reason', type: 'text', maxlength: '500', placeholder: 'reason (goes into the history)', 'aria-label': 'reason' }),
    el('button', { type: 'submit' }, 'apply'),
    el('output', { class: 'result' }));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    send(form).catch((e) => show(form, false, 'failed: ' + e));
  });
  return form;
}

function show(form, ok, text) {
  const out = $('.result', form);
  out.className = 'result ' + (ok ? 'ok' : 'refused');
  out.textContent = text;
}

async function send(form) {
  const token = $('#token').value.trim();
  sessionStorage.setItem('canary-token', token);
  const body = {
    service: form.dataset.service,
    action: form.elements.action.value,
    reason: form.elements.reason.value,
  };
  if (body.action === 'set-weight') body.weight = Number(form.elements.weight.value);
  const headers = { 'Content-Type': 'application/json' };
  if (token) headers.Authorization = 'Bearer ' + token;
  const r = await fetch('/api/control', { method: 'POST', headers, body: JSON.stringify(body) });
  const answer = await r.json();
  if (answer.ok) {
    const s = answer.status.services[0];
    show(form, true, 'done: ' + body.action + (s.rollout ? ' (rollout ' + s.rollout.state + ')' : '') + ', weight ' + s.weight + '%');
  } else {
    show(form, false, answer.error);
  }
}

function section(service) {
  const id = 'svc-' + service.name;
  let s = document.getElementById(id);
  if (!s) {
    s = el('section', { class: 'service', id, 'data-service': service.name });
    s.append(el('h2', {}, service.name));
    if (controls) s.append(controlForm(service.name));
    s.append(el('div', { class: 'live' }));
    $('#services').append(s);
  }
  return s;
}

function render(snapshot) {
  const empty = $('#services .empty');
  if (empty && snapshot.services.length) empty.remove();
  const names = new Set();
  for (const service of snapshot.services) {
    names.add('svc-' + service.name);
    const s = section(service);
    s.dataset.weightBp = service.weight_bp;
    s.dataset.state = service.state || '';
    // Server-rendered, escaped HTML and SVG from the agent itself.
    $('.live', s).innerHTML = service.html;
  }
  for (const s of document.querySelectorAll('section.service')) {
    if (!names.has(s.id)) s.remove();
  }
  if (Number.isFinite(snapshot.now_ms) && snapshot.now_ms > 0) {
    $('#updated').textContent = 'controller clock ' + new Date(snapshot.now_ms).toISOString().slice(11, 19) + 'Z';
  }
}

async function start() {
  const info = await (await fetch('/api/info')).json();
  controls = info.controls;
  if (controls) {
    $('#token-box').hidden = false;
    $('#token').value = sessionStorage.getItem('canary-token') || '';
    $('#mode').textContent = 'controls need the token';
  } else {
    $('#mode').textContent = 'read-only (no ui_token_file configured)';
  }
  const events = new EventSource('/api/events');
  events.addEventListener('snapshot', (ev) => render(JSON.parse(ev.data)));
  events.onopen = () => { $('#conn').textContent = 'live'; $('#conn').className = 'conn live'; };
  events.onerror = () => { $('#conn').textContent = 'reconnecting…'; $('#conn').className = 'conn'; };
}

start().catch((e) => { $('#conn').textContent = 'error: ' + e; });
