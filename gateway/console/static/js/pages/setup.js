import { api } from "../api.js";
import { onSubmit } from "../dom.js";

const form = document.getElementById("setup-form");
if (form) {
  onSubmit(form, async (data) => {
    await api("POST", "/v1/auth/setup", {
      json: { email: data.get("email"), display_name: data.get("display_name"), password: data.get("password") },
      project: false,
    });
    location.assign("/console");
  });
  document.getElementById("setup-email").focus();
}
