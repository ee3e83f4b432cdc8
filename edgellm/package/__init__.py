"""Mobile app packaging: `edgellm package android` (Gradle project + offline APK) and `edgellm package ios`
(Swift package + SwiftUI demo app). The Python API the CLI calls:

    from edgellm.package import package_android, package_ios
    package_android("smol-onnx", "smol-app", apk=True, system="You are a museum guide.")

Modules: source (model checks, plan, manifest), manifest, natives (pinned npm binaries), hostbuild +
engine + state (the app's C on this machine, the shipped llama.cpp state), jnibuild + apk + ziptools +
elfinfo (the offline APK), android (the Gradle project), ios (the Swift package and demo app).
"""
from __future__ import annotations

from typing import Any


def package_android(*args: Any, **kwargs: Any):
    from .android import package_android as run

    return run(*args, **kwargs)


def package_ios(*args: Any, **kwargs: Any):
    from .ios import package_ios as run

    return run(*args, **kwargs)


__all__ = ["package_android", "package_ios"]
