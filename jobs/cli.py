"""The `sdbatch` command."""
import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Stable Diffusion 1.x batch generation on Ray.")


@app.callback()
def main() -> None:
    """Stable Diffusion 1.x batch generation on Ray."""
