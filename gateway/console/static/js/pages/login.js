import { api } from "../api.js";
import { onSubmit } from "../dom.js";

// Only a page of this console is a place to go back to (never another site).
export function safeNext(search) {
  const next = new URLSearchParams(search).get("next") || "";
  return /^\/console(\/[A-Za-z0-9._~\-/%]*)?$/.test(next) && !next.includes("//") ? next : "/console";
}

const form = document.getElementById("login-form");
onSubmit(form, async (data) => {
  await api("POST", "/v1/auth/login", {
    json: { email: data.get("email"), password: data.get("password") },
    project: false,
  });
  location.assign(safeNext(location.search));
});
document.getElementById("login-email").focus();
