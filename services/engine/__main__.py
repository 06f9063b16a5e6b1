from .cli import app

app(prog_name="vecta-engine")
