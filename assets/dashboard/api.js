// Calls to the node's API with the API key, and the key itself. The key lives in sessionStorage
// (this tab only, gone when it closes), is sent as a bearer token, and never goes in a URL.

const KEY_NAME = 'llmesh.apiKey';

/** The API answered 401: the key is missing or wrong. */
export class AuthRequired extends Error {
  constructor() {
    super('an API key is required');
  }
}

/** Any other failed call, with the API's own message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_NAME);
  } catch {
    return null;
  }
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function clearApiKey() {
  sessionStorage.removeItem(KEY_NAME);
}

let authListener = () => {};

/** Called whenever a call answers 401. */
export function onAuthRequired(listener) {
  authListener = listener;
}

/** `fetch` with the key; throws `AuthRequired` on 401. */
export async function apiFetch(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = apiKey();
  if (key) headers.set('Authorization', `Bearer ${key}`);
  const response = await fetch(path, { ...init, headers, cache: 'no-store', credentials: 'omit' });
  if (response.status === 401) {
    authListener();
    throw new AuthRequired();
  }
  return response;
}

/** GET a JSON document, giving up after `timeoutMs`. */
export async function getJson(path, timeoutMs = 8000) {
  const response = await apiFetch(path, { signal: AbortSignal.timeout(timeoutMs) });
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response.json();
}

/** POST a JSON body and read the JSON answer; a refusal throws `ApiError` with the API's message. */
export async function postJson(path, body, timeoutMs = 15000) {
  const response = await apiFetch(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response.json();
}

/** The message of an OpenAI-style error body, or the status when there is none. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}
