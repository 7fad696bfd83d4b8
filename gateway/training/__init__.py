"""The training platform's routes: files and fine-tuning jobs, shaped as OpenAI's API. Exports
ROUTES, which gateway/app.py mounts; the jobs themselves run in worker processes (worker/)."""
