// The REST API: every request carries the token from sessionStorage as a
// bearer token. The token is never logged, put in a URL or kept beyond
// this tab.
const KEY = 'radrelay.dashboard.token';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onUnauthorized = () => {};

export const auth = {
  get token() {
    return sessionStorage.getItem(KEY);
  },
  set(token) {
    sessionStorage.setItem(KEY, token);
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
  // fn(error) runs when the API answers 401 (token unknown or withdrawn).
  onUnauthorized(fn) {
    onUnauthorized = fn;
  },
};

// api('/api/messages?mrn=...'): the JSON answer (text with {text: true});
// throws ApiError for a non-2xx answer (status, code and message from the
// API's {"error", "message"}) and for a network failure (status 0).
export async function api(path, {method = 'GET', body, text = false} = {}) {
  const headers = {Accept: text ? 'text/plain' : 'application/json'};
  const token = auth.token;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let r;
  try {
    r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
      redirect: 'error',
    });
  } catch (e) {
    throw new ApiError(0, 'network', 'The engine does not answer.');
  }
  if (!r.ok) {
    let j = null;
    try {
      j = await r.json();
    } catch (e) {
      j = null;
    }
    const err = new ApiError(r.status, j?.error ?? `http_${r.status}`, j?.message ?? r.statusText);
    if (r.status === 401) onUnauthorized(err);
    throw err;
  }
  return text ? r.text() : r.json();
}

// A query string of the non-empty values.
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}
