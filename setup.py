"""Package list for setuptools (everything else is in pyproject.toml).

The shipped recipes stay at the repository's top level (``recipes/``) and travel inside the
package as ``lora_cli.shipped_recipes`` (pyproject's ``package-dir`` maps that name onto the
folder). A mapped package has to be named in ``packages``, which pyproject's
``packages.find`` cannot add to, so the list is built here: every ``lora_cli`` package found
on disk (new sub-packages included without editing a list) plus the mapped ones.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["lora_cli", "lora_cli.*"], exclude=["*.__pycache__"]),
        "lora_cli.shipped_recipes",
        "lora_cli.shipped_recipes.data",
    ]
)
