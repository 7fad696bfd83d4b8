"""Job workers: `aimass worker` claims fine-tuning jobs from the control-plane database and runs
them with the trainer, the exporters and the registry. The top layer: the gateway never imports
it (training never runs in the serving process); `aimass serve --workers N` starts workers as
child processes."""
