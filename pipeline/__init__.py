"""The promotion pipeline (`aimass pipeline promote`): a candidate model through export, parity,
evaluation against production, a load test, a watched canary and the registry's gates to the
`production` alias, resumable after a failure. Nothing imports this package."""
