"""The Android app template `edgellm package android` fills in (installed as edgellm.android_template).

apk/     the offline APK: AndroidManifest.xml, res/, the Java side in smali (no d8 exists to compile Java)
gradle/  the Gradle project a developer opens in Android Studio (*.j2 files are rendered with Jinja)
"""
