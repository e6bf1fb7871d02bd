"""The one build step pyproject.toml cannot declare: ``ldm_pipeline_diffusers.pth`` at the top of site-packages,
the start-up line that lets plain Diffusers load a LatentDiffusionPipeline directory (ldm_pipeline_diffusers.py
says how). Everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_FILE = "ldm_pipeline_diffusers.pth"
# Does nothing when the module is gone (an editable install whose checkout no longer has it), rather than print an
# error at every start of Python.
STARTUP_LINE = ('import importlib.util; importlib.util.find_spec("ldm_pipeline_diffusers") and '
                '__import__("ldm_pipeline_diffusers").install()\n')


class BuildPyWithStartupFile(build_py):
    """``build_py`` that also writes the .pth file where the wheel's top level is assembled: ``build_lib`` for a
    wheel, the editable wheel's own folder (``install_lib``) for ``pip install -e``."""

    def run(self):
        super().run()
        top = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(top).mkdir(parents=True, exist_ok=True)
        Path(top, STARTUP_FILE).write_text(STARTUP_LINE)


setup(cmdclass={"build_py": BuildPyWithStartupFile})
