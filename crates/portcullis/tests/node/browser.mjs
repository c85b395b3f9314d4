// The browser half of the end-to-end session test: headless Chromium (Debian's
// package) driven by playwright-core. It opens the SPA behind the gateway, logs in
// at the provider, calls the API, opens a WebSocket, logs out and is refused.
// Each step prints one JSON line; any failure exits non-zero with the reason.
//
// Environment: GW_URL (the gateway, e.g. http://127.0.0.1:8080), USER_NAME,
// CHROMIUM (the browser binary), SCREENSHOT (file written on failure).
import { chromium } from 'playwright-core';

const GW = process.env.GW_URL;
const USER = process.env.USER_NAME || 'alice';
const step = (name, data = {}) => process.stdout.write(`${JSON.stringify({ step: name, ...data })}\n`);
const fail = (why) => { throw new Error(why); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage();
page.setDefaultTimeout(20000);
try {
  // 1. The SPA: anonymous.
  await page.goto(`${GW}/app/`);
  await page.waitForFunction(() => document.getElementById('me').textContent !== 'loading');
  const before = await page.textContent('#me');
  if (before !== 'anonymous') fail(`expected anonymous, got ${before}`);
  step('anonymous');

  // 2. Log in: the provider's form, then back to the SPA.
  await page.click('#login');
  await page.waitForURL((u) => !u.toString().startsWith(GW));
  step('at_provider', { url: page.url().split('?')[0] });
  await page.fill('input[name=login]', USER);
  await page.fill('input[name=password]', 'any');
  await page.click('button[type=submit]');
  // A consent page, when the provider shows one.
  if (!page.url().startsWith(GW)) {
    const consent = await page.$('button[type=submit]');
    if (consent) await consent.click();
  }
  await page.waitForURL(`${GW}/app/`);
  await page.waitForFunction(() => document.getElementById('me').textContent.startsWith('user:'));
  step('logged_in', { me: await page.textContent('#me') });

  // 3. The session cookie is invisible to scripts; the API sees the user.
  const jsCookies = await page.evaluate(() => document.cookie);
  const cookies = await page.context().cookies();
  const sid = cookies.find((c) => c.name === 'sid');
  if (!sid || !sid.httpOnly) fail(`session cookie missing or readable: ${JSON.stringify(cookies)}`);
  if (jsCookies.includes('sid=')) fail(`document.cookie shows the session: ${jsCookies}`);
  await page.evaluate(() => { document.cookie = 'pref=1; path=/'; });
  const echo = await page.evaluate(async () => (await fetch('/api/echo')).json());
  const upstreamCookie = (echo.headers.cookie || []).join(';');
  if (JSON.stringify(echo.headers['x-user-sub']) !== JSON.stringify([USER])) fail(`identity: ${JSON.stringify(echo.headers)}`);
  if (upstreamCookie.includes(sid.value)) fail('the session cookie reached the upstream');
  if (!upstreamCookie.includes('pref=1')) fail(`other cookies dropped: ${upstreamCookie}`);
  step('api', { sub: echo.headers['x-user-sub'][0] });

  // 4. A WebSocket: the upstream's first message is the headers it received.
  const ws = await page.evaluate((url) => new Promise((resolve) => {
    const s = new WebSocket(url);
    s.onmessage = (m) => { resolve({ first: m.data }); s.close(); };
    s.onerror = () => resolve({ error: true });
  }), `${GW.replace('http', 'ws')}/ws`);
  if (ws.error) fail('WebSocket refused while logged in');
  const seen = JSON.parse(ws.first);
  if (seen['x-user-sub'] !== USER) fail(`WebSocket identity: ${ws.first}`);
  if ((seen.cookie || '').includes(sid.value)) fail('the session cookie reached the WebSocket upstream');
  step('websocket', { sub: seen['x-user-sub'] });

  // 5. Log out (the SPA's button: a same-origin POST), then everything is refused.
  await page.click('#logout-button');
  await page.waitForFunction(() => document.getElementById('me').textContent.startsWith('logout:'));
  const logout = await page.textContent('#me');
  if (logout !== 'logout:204') fail(`logout answered ${logout}`);
  const after = await page.evaluate(async () => ({
    me: (await fetch('/auth/me')).status,
    api: (await fetch('/api/echo')).status,
  }));
  if (after.me !== 401 || after.api !== 401) fail(`after logout: ${JSON.stringify(after)}`);
  const wsAfter = await page.evaluate((url) => new Promise((resolve) => {
    const s = new WebSocket(url);
    s.onopen = () => resolve('open');
    s.onerror = () => resolve('refused');
  }), `${GW.replace('http', 'ws')}/ws`);
  if (wsAfter !== 'refused') fail('WebSocket opened after logout');
  step('logged_out', after);
  await browser.close();
} catch (e) {
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT }).catch(() => {});
  step('failed', { error: String(e && e.message || e), url: page.url() });
  await browser.close();
  process.exit(1);
}
