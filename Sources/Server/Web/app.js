// The Vireo manager: VirtualBox Manager's layout over the REST API (docs/web-ui.md).
// Plain modules and Debian's libraries (xterm.js, noVNC, Chart.js); no build step. The libraries
// are loaded when a tab first needs them, so the list is up before 1 MB of script is parsed.

const $ = (id) => document.getElementById(id);
const loaded = new Map();
function loadScript(url) {
  if (!loaded.has(url)) {
    loaded.set(url, new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = url;
      script.onload = resolve;
      script.onerror = () => reject(new Error(`could not load ${url}`));
      document.head.append(script);
    }));
  }
  return loaded.get(url);
}
function loadStyle(url) {
  if (!loaded.has(url)) {
    const link = document.createElement('link');
    link.rel = 'stylesheet';
    link.href = url;
    document.head.append(link);
    loaded.set(url, Promise.resolve());
  }
}
const state = { token: null, vms: [], selected: null, host: null, tasks: new Map(),
                terminal: null, consoleSocket: null, rfb: null, charts: null, statsTimer: null,
                lastStats: null, selectedSnapshot: null, pool: null };

// ---- the token: from the address `vireo serve` prints (#token=...), kept for this tab only

function takeToken() {
  const match = location.hash.match(/token=([0-9a-f]+)/);
  if (match) {
    sessionStorage.setItem('vireo-token', match[1]);
    history.replaceState(null, '', location.pathname);
  }
  state.token = sessionStorage.getItem('vireo-token');
}

async function askToken() {
  $('login').showModal();
  await new Promise((resolve) => $('login').addEventListener('close', resolve, { once: true }));
  state.token = $('login-token').value.trim();
  sessionStorage.setItem('vireo-token', state.token);
}

// ---- the API

class Problem extends Error {
  constructor(body) { super(body.detail || body.title); this.body = body; }
}

async function api(method, path, body) {
  const headers = { 'Authorization': `Bearer ${state.token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) { await askToken(); return api(method, path, body); }
  const type = response.headers.get('Content-Type') || '';
  const data = type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) throw new Problem(typeof data === 'object' ? data : { detail: String(data) });
  return data;
}

function say(text, isError = false) {
  const status = $('status');
  status.textContent = text;
  status.className = isError ? 'error' : '';
}

const gib = 1024 * 1024 * 1024, mib = 1024 * 1024;
function size(bytes) {
  if (bytes === undefined || bytes === null) return '-';
  if (bytes >= gib) return `${(bytes / gib).toFixed(bytes % gib ? 1 : 0)} GiB`;
  return `${Math.round(bytes / mib)} MiB`;
}

// ---- the machine list

function renderList() {
  const body = document.querySelector('#vm-list tbody');
  body.replaceChildren();
  $('vm-empty').hidden = state.vms.length > 0;
  for (const vm of state.vms) {
    const row = document.createElement('tr');
    row.dataset.name = vm.name;
    row.className = vm.name === state.selected ? 'selected' : '';
    const cells = [vm.name, vm.state + (vm.isolation_off ? ` (${vm.isolation_off})` : '') + (vm.managed_by ? ` [${vm.managed_by}]` : ''), vm.os_type || '-',
                   vm.cpus ?? '-', size(vm.memory_bytes), vm.addresses.join(', ') || '-'];
    cells.forEach((text, index) => {
      const cell = document.createElement('td');
      cell.textContent = text;
      if (index === 1) cell.className = `state state-${vm.state}`;
      row.append(cell);
    });
    row.addEventListener('click', () => select(vm.name));
    body.append(row);
  }
  renderToolbar();
}

function selectedVM() { return state.vms.find((vm) => vm.name === state.selected); }

function renderToolbar() {
  const vm = selectedVM();
  const actions = new Set(vm ? vm.actions : []);
  for (const button of document.querySelectorAll('#toolbar button[data-action]')) {
    button.disabled = !actions.has(button.dataset.action);
  }
}

async function refresh() {
  try {
    state.vms = await api('GET', '/api/vms');
  } catch (error) { say(error.message, true); return; }
  if (state.selected && !selectedVM()) { state.selected = null; renderDetails(null); }
  renderList();
}

async function select(name) {
  if (state.selected !== name) disconnectConsoles();
  state.selected = name;
  state.lastStats = null;
  resetCharts();
  renderList();
  await showDetails();
}

async function showDetails() {
  if (!state.selected) return;
  try {
    const details = await api('GET', `/api/vms/${encodeURIComponent(state.selected)}`);
    renderDetails(details);
    renderSnapshots(details);
    renderGuest(details);
  } catch (error) { say(error.message, true); }
}

function agentText(agent) {
  if (!agent) return 'none (this engine has no agent channel yet)';
  if (agent.answers === true) return `qemu-guest-agent ${agent.version || 'unknown'} answers (${agent.channel})`;
  if (agent.answers === false) return `none answers on its ${agent.channel}`;
  return `reached on its ${agent.channel} while the VM runs`;
}

function renderDetails(details) {
  const target = $('tab-details');
  target.replaceChildren();
  if (!details) { target.innerHTML = '<p class="hint">Select a VM.</p>'; return; }
  const d = details.definition || {};
  const rows = [
    ['Name', details.summary.name], ['State', details.summary.state + (details.crash_reason ? ` — ${details.crash_reason}` : '')],
    ['OS type', d.os_type], ['Engine', d.engine], ['CPUs', d.cpus], ['Memory', size(d.memory_bytes)],
    ['Kernel', d.kernel || (d.firmware ? `firmware ${d.firmware}` : '-')], ['Command line', d.command_line],
    ['ISO', d.iso || '-'], ['Disks', (d.disks || []).map((disk) => `${disk.path} (${disk.format})`).join(', ') || 'none'],
    ['Disk use', `${size(details.summary.disk_allocated_bytes)} of ${size(details.summary.disk_virtual_bytes)}`],
    ['TPM', d.tpm ? 'TPM 2.0 (swtpm)' : 'none'], ['Secure Boot', d.secure_boot ? 'on' : 'off'],
    ['Shared folders', (d.shares || []).map((share) => `${share.path} as ${share.tag}${share.read_only ? ' (read-only)' : ''}`).join(', ') || 'none'],
    ['Guest agent', agentText(details.guest_agent)],
    ['Network', (d.networks || []).map((card) => `${card.mac} ${JSON.stringify(card.attachment)}`).join('; ') || 'none'],
    ['IP', details.summary.addresses.join(', ') || '-'],
    ['Running', details.runtime ? `pid ${details.runtime.pid}, up ${Math.round(details.runtime.uptime_ms / 1000)} s` : '-'],
    ['Snapshots', String(details.snapshots.length)], ['Directory', details.directory],
  ];
  const table = document.createElement('table');
  table.className = 'properties';
  for (const [key, value] of rows) {
    const row = table.insertRow();
    row.insertCell().textContent = key;
    row.insertCell().textContent = value ?? '-';
  }
  target.append(table);
}

// ---- toolbar actions

async function confirmDialog(text, inputCaption, initial = '') {
  $('confirm-text').textContent = text;
  $('confirm-input-label').hidden = !inputCaption;
  $('confirm-input-caption').textContent = inputCaption || '';
  $('confirm-input').value = initial;
  $('confirm').showModal();
  await new Promise((resolve) => $('confirm').addEventListener('close', resolve, { once: true }));
  if ($('confirm').returnValue !== 'ok') return null;
  return inputCaption ? $('confirm-input').value.trim() : true;
}

async function act(action) {
  const name = state.selected;
  if (!name) return;
  const path = `/api/vms/${encodeURIComponent(name)}`;
  try {
    switch (action) {
      case 'start': say(`Starting ${name}…`); await api('POST', `${path}/start`, {}); break;
      case 'stop': say(`Shutting ${name} down…`); await api('POST', `${path}/stop`, {}); break;
      case 'force-stop': say(`Powering ${name} off…`); await api('POST', `${path}/stop`, { force: true }); break;
      case 'pause': await api('POST', `${path}/pause`, {}); break;
      case 'resume': await api('POST', `${path}/resume`, {}); break;
      case 'reset': await api('POST', `${path}/reset`, {}); break;
      case 'save': await api('POST', `${path}/save`, {}); break;
      case 'snapshot': await takeSnapshot(); break;
      case 'clone': {
        const target = await confirmDialog(`Clone ${name} (full copy of its disks):`, 'New name', `${name}-clone`);
        if (!target) return;
        await api('POST', `${path}/clone`, { name: target });
        break;
      }
      case 'delete': {
        if (!await confirmDialog(`Delete VM ${name} and its disks? This cannot be undone.`)) return;
        await api('DELETE', path);
        state.selected = null;
        renderDetails(null);
        break;
      }
    }
    say(`${name}: ${action} done`);
  } catch (error) {
    say(error.message, true);
  }
  await refresh();
  await showDetails();
}

// ---- the New wizard

async function openWizard() {
  state.host = state.host || await api('GET', '/api/host');
  const host = state.host;
  const types = $('wz-ostype');
  if (!types.options.length) {
    for (const type of host.os_types) types.add(new Option(`${type.identifier} — ${type.description}`, type.identifier));
    types.value = host.os_types.some((t) => t.identifier === 'linux-64') ? 'linux-64' : host.os_types[0].identifier;
  }
  $('wz-cpus').max = Math.min(host.cpus * 4, host.maximum_vcpus);
  $('wz-memory').max = Math.max(256, Math.floor(host.memory_bytes / mib / 2 / 64) * 64);
  const images = await api('GET', '/api/images');
  $('wz-image').replaceChildren(...images.map((image) => new Option(`${image.manifest.name} — ${image.manifest.description}`, image.manifest.name)));
  if (!images.length) $('wz-image').add(new Option('(no images: `vireo image build debian-12`)', ''));
  const networks = await api('GET', '/api/networks');
  $('wz-network').replaceChildren(new Option('NAT (default)', 'nat'), new Option('None', 'none'),
    ...networks.filter((n) => n.network.name !== 'default').map((n) => new Option(`${n.network.name} (${n.network.mode})`, `network:${n.network.name}`)));
  applyOSDefaults();
  $('wz-error').textContent = '';
  $('wizard').showModal();
}

function applyOSDefaults() {
  const type = state.host.os_types.find((t) => t.identifier === $('wz-ostype').value);
  if (!type) return;
  $('wz-cpus').value = type.cpus;
  $('wz-memory').value = Math.round(type.memory_bytes / mib);
  $('wz-disk').value = Math.round(type.disk_bytes / gib);
  updatePreview();
}

function wizardRequest() {
  const source = document.querySelector('input[name="wz-source"]:checked').value;
  const request = { name: $('wz-name').value.trim(), os_type: $('wz-ostype').value, cpus: Number($('wz-cpus').value),
                    memory_bytes: Number($('wz-memory').value) * mib };
  const disk = Number($('wz-disk').value);
  if (disk > 0) request.disk_bytes = disk * gib; else request.without_disk = true;
  if (source === 'image' && $('wz-image').value) request.image = $('wz-image').value;
  if (source === 'kernel' && $('wz-kernel').value.trim()) request.kernel = $('wz-kernel').value.trim();
  if (source === 'iso' && $('wz-iso').value.trim()) request.iso = $('wz-iso').value.trim();
  // The installer's answers (docs/unattended.md): only with an ISO; the server keeps the
  // password's hash only.
  if (source === 'iso' && $('wz-unattended').checked) {
    const unattended = { password: $('wz-password').value };
    for (const [field, key] of [['wz-user', 'user'], ['wz-hostname', 'hostname'], ['wz-locale', 'locale'], ['wz-timezone', 'timezone']]) {
      if ($(field).value.trim()) unattended[key] = $(field).value.trim();
    }
    const packages = $('wz-packages').value.split(',').map((p) => p.trim()).filter((p) => p);
    if (packages.length) unattended.packages = packages;
    request.unattended = unattended;
  }
  if ($('wz-cmdline').value.trim()) request.command_line = $('wz-cmdline').value.trim();
  const network = $('wz-network').value;
  request.nics = network === 'none' ? [] : [network];
  if ($('wz-firmware').value) request.firmware = $('wz-firmware').value;
  // Windows 11's needs, as VirtualBox's System settings give them; the OS type's when unset.
  if ($('wz-secure-boot').value) request.secure_boot = $('wz-secure-boot').value === 'on';
  if ($('wz-tpm').value) request.tpm = $('wz-tpm').value === 'on';
  return request;
}

function updatePreview() {
  $('wz-cpus-out').value = $('wz-cpus').value;
  $('wz-memory-out').value = `${$('wz-memory').value} MiB`;
  const request = wizardRequest();
  const lines = [`VM "${request.name || '?'}", ${request.os_type}`, `${request.cpus} vCPU, ${size(request.memory_bytes)} RAM`,
    request.disk_bytes ? `a thin ${size(request.disk_bytes)} qcow2 disk` : 'no disk',
    request.image ? `from image ${request.image}` : request.kernel ? `booting ${request.kernel}` : request.iso ? `installer ${request.iso} (qemu engine)` : 'no boot source yet',
    request.nics.length ? `network card on ${request.nics[0]}` : 'no network card'];
  if (request.firmware) lines.push(`${request.firmware.toUpperCase()} firmware${request.secure_boot ? ' with Secure Boot' : ''}`);
  else if (request.secure_boot) lines.push('Secure Boot (needs UEFI firmware)');
  if (request.tpm !== undefined) lines.push(request.tpm ? 'a TPM 2.0 (swtpm)' : 'no TPM');
  if (request.unattended) lines.push(`unattended install as ${request.unattended.user || 'the installer\'s usual user'} (sudo); it powers off when done, the next start boots the system`);
  $('wz-preview').textContent = `Will create:\n  ${lines.join('\n  ')}`;
}

async function submitWizard(event) {
  event.preventDefault();
  if (!$('wizard-form').reportValidity()) return;
  try {
    const created = await api('POST', '/api/vms', wizardRequest());
    $('wizard').close();
    say(`Created ${created.definition.name}` + (created.notes.length ? ` (${created.notes.join('; ')})` : ''));
    await refresh();
    await select(created.definition.name);
  } catch (error) {
    $('wz-error').textContent = error.message;
  }
}

// ---- storage pools (VirtualBox's media manager, libvirt's pools): GET/POST/DELETE /api/pools

async function openStorage() {
  $('storage-error').textContent = '';
  await renderPools();
  if (!$('storage').open) $('storage').showModal();
}

async function renderPools() {
  const pools = await api('GET', '/api/pools');
  const body = $('pool-list').tBodies[0];
  body.replaceChildren();
  if (!pools.length) body.insertRow().insertCell().textContent = 'No pools.';
  for (const pool of pools) {
    const row = body.insertRow();
    row.dataset.name = pool.name;
    row.className = pool.name === state.pool ? 'selected' : '';
    for (const text of [pool.name, pool.type, pool.source + (pool.target ? ` ${pool.target}` : ''), pool.shared ? 'yes' : 'no']) row.insertCell().textContent = text;
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.textContent = 'Delete';
    remove.addEventListener('click', (event) => { event.stopPropagation(); storageAction(async () => {
      await api('DELETE', `/api/pools/${encodeURIComponent(pool.name)}`);
      if (state.pool === pool.name) state.pool = null;
      say(`Pool ${pool.name} deleted (its volumes stay where they are)`);
    }); });
    row.insertCell().append(remove);
    row.addEventListener('click', () => storageAction(async () => { state.pool = pool.name; }));
  }
  await renderVolumes();
}

async function renderVolumes() {
  const table = $('volume-list');
  table.replaceChildren();
  $('volume-error').textContent = '';
  $('volume-set').disabled = !state.pool;
  if (!state.pool) { $('pool-title').textContent = 'Select a pool.'; return; }
  const report = await api('GET', `/api/pools/${encodeURIComponent(state.pool)}`);
  $('pool-title').textContent = `Volumes of ${state.pool}`;
  // A server that does not answer: the listing says why instead of failing the view.
  if (report.volumes_error) $('volume-error').textContent = report.volumes_error;
  const users = new Map((report.users || []).map((user) => [user.disk, user.vm]));
  if (!report.volumes.length && !report.volumes_error) table.insertRow().insertCell().textContent = 'No volumes.';
  for (const volume of report.volumes) {
    const row = table.insertRow();
    row.dataset.name = volume.name;
    for (const text of [volume.name, volume.format, size(volume.virtual_size), volume.allocated_bytes === undefined ? '' : `${size(volume.allocated_bytes)} used`,
                        users.has(volume.path) ? `in use by ${users.get(volume.path)}` : 'free']) row.insertCell().textContent = text;
  }
}

// Runs `body`, then shows the pools again, or the error in the dialog.
async function storageAction(body) {
  $('storage-error').textContent = '';
  try { await body(); } catch (error) { $('storage-error').textContent = error.message; }
  try { await renderPools(); } catch (error) { $('storage-error').textContent = error.message; }
}

function createPool() {
  return storageAction(async () => {
    const request = { name: $('pool-name').value.trim(), type: $('pool-type').value, source: $('pool-source').value.trim(), shared: $('pool-shared').checked };
    if ($('pool-target').value.trim()) request.target = $('pool-target').value.trim();
    const pool = await api('POST', '/api/pools', request);
    state.pool = pool.name;
    say(`Pool ${pool.name} created`);
    for (const id of ['pool-name', 'pool-source', 'pool-target']) $(id).value = '';
  });
}

function createVolume() {
  return storageAction(async () => {
    const request = { name: $('volume-name').value.trim(), size_bytes: Number($('volume-size').value) * gib, format: $('volume-format').value };
    await api('POST', `/api/pools/${encodeURIComponent(state.pool)}/volumes`, request);
    say(`Volume ${request.name} created in ${state.pool}`);
    $('volume-name').value = '';
  });
}

// ---- the serial console (xterm.js over a WebSocket)

function socketURL(kind) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/api/vms/${encodeURIComponent(state.selected)}/${kind}`;
}

async function connectConsole() {
  if (!state.selected) return;
  disconnectConsole();
  loadStyle('/static/xterm.css');
  await loadScript('/static/xterm.js');
  if (!state.terminal) {
    // The DOM renderer keeps the text in the page (selectable, and readable by tests).
    state.terminal = new Terminal({ cols: 80, rows: 30, rendererType: 'dom', convertEol: false });
    state.terminal.open($('terminal'));
    window.vireoTerminal = state.terminal;
    state.terminal.on('data', (data) => {
      if (state.consoleSocket && state.consoleSocket.readyState === WebSocket.OPEN) state.consoleSocket.send(new TextEncoder().encode(data));
    });
  }
  state.terminal.reset();
  const socket = new WebSocket(socketURL('console'), ['vireo.console', `vireo.token.${state.token}`]);
  socket.binaryType = 'arraybuffer';
  const decoder = new TextDecoder('utf-8');
  socket.onopen = () => { $('console-state').textContent = `connected to ${state.selected}`; state.terminal.focus(); };
  socket.onmessage = (event) => {
    state.terminal.write(typeof event.data === 'string' ? event.data : decoder.decode(event.data, { stream: true }));
  };
  socket.onclose = (event) => { $('console-state').textContent = `disconnected${event.reason ? `: ${event.reason}` : ''}`; };
  state.consoleSocket = socket;
}

function disconnectConsole() {
  if (state.consoleSocket) { state.consoleSocket.onclose = null; state.consoleSocket.close(); state.consoleSocket = null; }
  $('console-state').textContent = '';
}

async function pasteIntoConsole() {
  const text = await navigator.clipboard.readText();
  if (state.consoleSocket) state.consoleSocket.send(new TextEncoder().encode(text.replace(/\r?\n/g, '\r')));
}

// ---- the graphical console (noVNC)

async function connectDisplay() {
  if (!state.selected) return;
  disconnectDisplay();
  $('display-state').textContent = 'connecting…';
  const { default: RFB } = await import('/static/novnc/core/rfb.js');
  const rfb = new RFB($('screen'), socketURL('display'), { wsProtocols: ['binary', `vireo.token.${state.token}`] });
  rfb.scaleViewport = true;
  rfb.addEventListener('connect', () => { $('display-state').textContent = `connected to ${state.selected}`; });
  rfb.addEventListener('disconnect', (event) => {
    $('display-state').textContent = event.detail.clean ? 'disconnected' : 'the display could not be reached (is the VM running on the qemu engine?)';
  });
  state.rfb = rfb;
  window.vireoDisplay = rfb;
}

function disconnectDisplay() {
  if (state.rfb) { try { state.rfb.disconnect(); } catch (_) { /* already gone */ } state.rfb = null; }
}

// Pasted text is typed as key presses: guests at a login prompt or an installer have no clipboard.
function typeText(text) {
  if (!state.rfb) return;
  for (const character of text) {
    const code = character.codePointAt(0);
    const keysym = character === '\n' ? 0xff0d : character === '\t' ? 0xff09 : code < 0x100 ? code : 0x01000000 + code;
    state.rfb.sendKey(keysym, null);
  }
}

function disconnectConsoles() { disconnectConsole(); disconnectDisplay(); }

// ---- live charts (Chart.js)

const palette = ['#2f6fdf', '#e0782b'];
function makeChart(id, title, labels, unit) {
  return new Chart($(id), {
    type: 'line',
    data: { labels: [], datasets: labels.map((label, index) => ({ label, data: [], pointRadius: 0, borderWidth: 2, tension: 0.2,
                                                                  borderColor: palette[index], backgroundColor: palette[index] })) },
    options: { animation: false, responsive: true, maintainAspectRatio: false,
               plugins: { title: { display: true, text: title } },
               scales: { y: { beginAtZero: true, title: { display: true, text: unit } }, x: { display: false } } },
  });
}

function resetCharts() {
  if (!state.charts) return;
  for (const chart of Object.values(state.charts)) {
    chart.data.labels = [];
    chart.data.datasets.forEach((set) => { set.data = []; });
    chart.update();
  }
}

async function sampleStats() {
  if (!state.selected || !document.getElementById('tab-charts').classList.contains('active')) return;
  if (!state.charts) {
    await loadScript('/static/chart.js');
    if (state.charts) return;
    state.charts = { cpu: makeChart('chart-cpu', 'CPU', ['host CPU used'], '%'),
                     memory: makeChart('chart-memory', 'Memory', ['resident', 'guest RAM'], 'MiB'),
                     disk: makeChart('chart-disk', 'Disk', ['read', 'written'], 'KiB/s'),
                     network: makeChart('chart-network', 'Network', ['received', 'sent'], 'KiB/s') };
  }
  let stats;
  try { stats = await api('GET', `/api/vms/${encodeURIComponent(state.selected)}/stats`); } catch (_) { return; }
  const last = state.lastStats;
  state.lastStats = stats;
  if (!last || last.name !== stats.name) return;
  const seconds = stats.sampled_at - last.sampled_at;
  if (seconds <= 0) return;
  const rate = (key) => (stats[key] !== undefined && last[key] !== undefined) ? Math.max(0, (stats[key] - last[key]) / seconds / 1024) : null;
  const push = (chart, values) => {
    chart.data.labels.push(new Date(stats.sampled_at * 1000).toLocaleTimeString());
    values.forEach((value, index) => chart.data.datasets[index].data.push(value));
    if (chart.data.labels.length > 60) { chart.data.labels.shift(); chart.data.datasets.forEach((set) => set.data.shift()); }
    chart.update();
  };
  const cpu = stats.cpu_seconds !== undefined && last.cpu_seconds !== undefined ? (stats.cpu_seconds - last.cpu_seconds) / seconds * 100 : null;
  push(state.charts.cpu, [cpu]);
  push(state.charts.memory, [stats.rss_bytes !== undefined ? stats.rss_bytes / mib : null, stats.memory_bytes !== undefined ? stats.memory_bytes / mib : null]);
  push(state.charts.disk, [rate('disk_read_bytes'), rate('disk_written_bytes')]);
  push(state.charts.network, [rate('network_received_bytes'), rate('network_transmitted_bytes')]);
}

// ---- snapshots

function renderSnapshots(details) {
  const target = $('snapshot-tree');
  target.replaceChildren();
  state.selectedSnapshot = null;
  $('snapshot-restore').disabled = $('snapshot-delete').disabled = true;
  const children = (parent) => details.snapshots.filter((s) => (s.parent ?? null) === parent);
  const build = (parent) => {
    const list = document.createElement('ul');
    for (const snapshot of children(parent)) {
      const item = document.createElement('li');
      const label = document.createElement('span');
      label.className = 'snapshot' + (snapshot.id === details.current_snapshot ? ' current' : '');
      label.dataset.id = snapshot.id;
      label.textContent = `${snapshot.name}${snapshot.has_memory ? ' (with memory)' : ''} — ${new Date(snapshot.created_at * 1000).toLocaleString()}`;
      label.addEventListener('click', () => {
        document.querySelectorAll('.snapshot.selected').forEach((node) => node.classList.remove('selected'));
        label.classList.add('selected');
        state.selectedSnapshot = snapshot.id;
        $('snapshot-restore').disabled = $('snapshot-delete').disabled = false;
      });
      item.append(label);
      const nested = build(snapshot.id);
      if (nested.children.length) item.append(nested);
      list.append(item);
    }
    return list;
  };
  const tree = build(null);
  if (!tree.children.length) target.innerHTML = '<p class="hint">No snapshots.</p>'; else target.append(tree);
  const now = document.createElement('p');
  now.className = 'hint';
  now.textContent = details.current_snapshot ? 'The VM now runs on from the snapshot marked in bold.' : '';
  target.append(now);
}

async function takeSnapshot() {
  const name = await confirmDialog(`Take a snapshot of ${state.selected}:`, 'Snapshot name', `snapshot-${state.vms.length ? new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-') : '1'}`);
  if (!name) return;
  await api('POST', `/api/vms/${encodeURIComponent(state.selected)}/snapshots`, { name });
}

async function snapshotAction(kind) {
  if (!state.selectedSnapshot) return;
  const path = `/api/vms/${encodeURIComponent(state.selected)}/snapshots/${state.selectedSnapshot}`;
  try {
    if (kind === 'restore') {
      if (!await confirmDialog('Restore this snapshot? The VM\'s current state is lost unless snapshotted.')) return;
      await api('POST', `${path}/restore`, {});
    } else {
      if (!await confirmDialog('Delete this snapshot?')) return;
      await api('DELETE', path);
    }
    say(`snapshot ${kind} done`);
  } catch (error) { say(error.message, true); }
  await refresh();
  await showDetails();
}

// ---- the guest: shared folders, commands, files

function renderGuest(details) {
  const table = $('share-list');
  table.replaceChildren();
  const shares = (details.definition || {}).shares || [];
  const stopped = ['stopped', 'crashed'].includes(details.summary.state);
  if (!shares.length) table.insertRow().insertCell().textContent = 'No shared folders.';
  for (const share of shares) {
    const row = table.insertRow();
    row.dataset.tag = share.tag;
    row.insertCell().textContent = share.tag;
    row.insertCell().textContent = share.path + (share.read_only ? ' (read-only)' : '');
    row.insertCell().textContent = `at ${share.mount_point || '/mnt/' + share.tag}`;
    const remove = document.createElement('button');
    remove.textContent = 'Remove';
    remove.disabled = !stopped;
    remove.addEventListener('click', () => guestAction(async (vm) => {
      await api('DELETE', `${vm}/shares/${encodeURIComponent(share.tag)}`);
      say(`${state.selected} no longer shares ${share.path}`);
    }));
    row.insertCell().append(remove);
  }
  $('share-add').disabled = !stopped;
  const running = ['running', 'paused'].includes(details.summary.state);
  for (const id of ['exec-run', 'file-upload-go', 'file-download-go']) $(id).disabled = !running;
}

// Runs `body` with the selected VM's API path, then shows what changed or what went wrong.
async function guestAction(body) {
  if (!state.selected) return;
  try { await body(`/api/vms/${encodeURIComponent(state.selected)}`); } catch (error) { say(error.message, true); }
  await showDetails();
}

async function addShare() {
  await guestAction(async (vm) => {
    const body = { path: $('share-path').value.trim(), read_only: $('share-readonly').checked };
    if ($('share-tag').value.trim()) body.tag = $('share-tag').value.trim();
    if ($('share-mount').value.trim()) body.mount_point = $('share-mount').value.trim();
    await api('POST', `${vm}/shares`, body);
    say(`${state.selected} shares ${body.path}; the guest mounts it at its next boot`);
    $('share-path').value = $('share-tag').value = $('share-mount').value = '';
  });
}

async function runCommand() {
  const output = $('exec-output');
  output.textContent = 'Running…';
  await guestAction(async (vm) => {
    try {
      const result = await api('POST', `${vm}/exec`, { command: ['/bin/sh', '-c', $('exec-command').value] });
      output.textContent = `exit status ${result.exit_code}${result.truncated ? ' (output truncated)' : ''}\n${result.stdout}${result.stderr ? '\n--- stderr\n' + result.stderr : ''}`;
    } catch (error) { output.textContent = error.message; throw error; }
  });
}

// Files go as the request's body and come back as the answer's: the server never takes a host path.
async function uploadFile() {
  const file = $('file-upload').files[0];
  const path = $('file-upload-path').value.trim();
  if (!file || !path) { say('Choose a file and the guest path to write it to', true); return; }
  await guestAction(async (vm) => {
    $('file-state').textContent = `Uploading ${file.name}…`;
    const response = await fetch(`${vm}/files?path=${encodeURIComponent(path)}`, {
      method: 'PUT', headers: { 'Authorization': `Bearer ${state.token}`, 'Content-Type': 'application/octet-stream' }, body: file });
    const data = await response.json();
    if (!response.ok) throw new Problem(data);
    $('file-state').textContent = `${data.bytes} bytes written to ${data.path}`;
  });
}

async function downloadFile() {
  const path = $('file-download-path').value.trim();
  await guestAction(async (vm) => {
    $('file-state').textContent = `Reading ${path}…`;
    const response = await fetch(`${vm}/files?path=${encodeURIComponent(path)}`, { headers: { 'Authorization': `Bearer ${state.token}` } });
    if (!response.ok) throw new Problem(await response.json());
    const link = document.createElement('a');
    link.href = URL.createObjectURL(await response.blob());
    link.download = path.split('/').pop() || 'download';
    link.click();
    $('file-state').textContent = `${path} downloaded`;
  });
}

// ---- tasks and the event stream

function renderTasks() {
  const list = $('task-list');
  list.replaceChildren();
  const recent = [...state.tasks.values()].sort((a, b) => b.created_at - a.created_at).slice(0, 6);
  for (const task of recent) {
    const item = document.createElement('li');
    item.className = `task task-${task.state}`;
    item.dataset.id = task.id;
    const progress = document.createElement('progress');
    progress.max = 1;
    if (task.progress !== undefined) progress.value = task.progress;
    if (task.state !== 'running') progress.value = 1;
    const text = document.createElement('span');
    text.textContent = ` ${task.kind} ${task.target}: ${task.state}` + (task.message && task.state === 'running' ? ` — ${task.message}` : '')
      + (task.error ? ` — ${task.error.detail}` : '') + (task.result && task.result.vm && task.kind === 'clone' ? ` → ${task.result.vm}` : '');
    item.append(progress, text);
    list.append(item);
  }
}

async function followEvents() {
  // EventSource cannot send the Authorization header, so the stream is read with fetch. The
  // stream is aborted when the page goes away: browsers keep six connections per server, and a
  // page left (or kept in the back-forward cache) must not hold one of them.
  const leaving = new AbortController();
  window.addEventListener('pagehide', () => leaving.abort());
  window.addEventListener('pageshow', (event) => { if (event.persisted) location.reload(); });
  for (;;) {
    if (leaving.signal.aborted) return;
    try {
      const response = await fetch('/api/events', { headers: { 'Authorization': `Bearer ${state.token}` }, signal: leaving.signal });
      if (!response.ok) throw new Error(`events: ${response.status}`);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const kind = (block.match(/^event: (.*)$/m) || [])[1];
          const data = (block.match(/^data: (.*)$/m) || [])[1];
          if (!kind || !data) continue;
          const payload = JSON.parse(data);
          if (kind === 'vm') { await refresh(); if (payload.name === state.selected) await showDetails(); }
          if (kind === 'task') {
            state.tasks.set(payload.id, payload);
            renderTasks();
            if (payload.state !== 'running') await refresh();
          }
        }
      }
    } catch (_) { /* the server went away: try again shortly */ }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// ---- wiring

function showTab(name) {
  document.querySelectorAll('#tabs button').forEach((button) => button.classList.toggle('active', button.dataset.tab === name));
  document.querySelectorAll('.tab').forEach((tab) => tab.classList.toggle('active', tab.id === `tab-${name}`));
  if (name === 'charts') sampleStats();
}

async function main() {
  takeToken();
  if (!state.token) await askToken();
  $('btn-new').addEventListener('click', () => openWizard().catch((error) => say(error.message, true)));
  $('btn-storage').addEventListener('click', () => openStorage().catch((error) => say(error.message, true)));
  $('pool-create').addEventListener('click', createPool);
  $('volume-create').addEventListener('click', createVolume);
  for (const button of document.querySelectorAll('#toolbar button[data-action]')) button.addEventListener('click', () => act(button.dataset.action));
  document.querySelectorAll('#tabs button').forEach((button) => button.addEventListener('click', () => showTab(button.dataset.tab)));
  $('wz-ostype').addEventListener('change', applyOSDefaults);
  $('wizard-form').addEventListener('input', updatePreview);
  $('wz-create').addEventListener('click', submitWizard);
  $('console-connect').addEventListener('click', () => connectConsole().catch((error) => say(error.message, true)));
  $('console-copy').addEventListener('click', () => state.terminal && navigator.clipboard.writeText(state.terminal.getSelection()));
  $('console-paste').addEventListener('click', () => pasteIntoConsole().catch((error) => say(error.message, true)));
  $('display-connect').addEventListener('click', () => connectDisplay().catch((error) => say(error.message, true)));
  $('display-type').addEventListener('click', () => typeText($('display-text').value));
  $('display-paste').addEventListener('click', () => navigator.clipboard.readText().then(typeText).catch((error) => say(error.message, true)));
  $('display-cad').addEventListener('click', () => state.rfb && state.rfb.sendCtrlAltDel());
  $('snapshot-take').addEventListener('click', async () => { try { await takeSnapshot(); } catch (error) { say(error.message, true); } await refresh(); await showDetails(); });
  $('snapshot-restore').addEventListener('click', () => snapshotAction('restore'));
  $('snapshot-delete').addEventListener('click', () => snapshotAction('delete'));
  $('share-add').addEventListener('click', addShare);
  $('exec-run').addEventListener('click', runCommand);
  $('file-upload-go').addEventListener('click', uploadFile);
  $('file-download-go').addEventListener('click', downloadFile);
  // The list and the tasks are asked for together: the page is ready after one round trip.
  const tasks = api('GET', '/api/tasks').catch(() => []);
  await refresh();
  for (const task of await tasks) state.tasks.set(task.id, task);
  renderTasks();
  setInterval(sampleStats, 2000);
  document.body.dataset.readyMs = String(Math.round(performance.now()));
  document.body.dataset.ready = 'true';
  followEvents();
}

main().catch((error) => say(error.message, true));
