# The JNI surface of edgellm's chat engine (edgellm/package/native/jni_bridge.c), written in smali
# because no Java-to-dex compiler (d8) exists on the packaging machine. The Gradle project declares
# the same methods in Kotlin (EdgeLLMNative.kt); edgellm's tests translate this class to JVM
# bytecode (enjarify) and drive the JNI library with it on the host.
.class public final Lai/edgellm/EdgeLLMNative;
.super Ljava/lang/Object;
.source "EdgeLLMNative.smali"


.method static constructor <clinit>()V
    .locals 1

    # onnxruntime-genai finds libonnxruntime.so with dlopen; loading it first makes that lookup trivial.
    # The llama.cpp build has no such library, hence the catch.
    :try_start_0
    const-string v0, "onnxruntime"
    invoke-static {v0}, Ljava/lang/System;->loadLibrary(Ljava/lang/String;)V
    :try_end_0
    .catch Ljava/lang/UnsatisfiedLinkError; {:try_start_0 .. :try_end_0} :no_ort

    :no_ort
    const-string v0, "edgellm_jni"
    invoke-static {v0}, Ljava/lang/System;->loadLibrary(Ljava/lang/String;)V
    return-void
.end method

.method private constructor <init>()V
    .locals 0

    invoke-direct {p0}, Ljava/lang/Object;-><init>()V
    return-void
.end method

.method public static native open(Ljava/lang/String;Ljava/lang/String;IILjava/lang/String;Ljava/lang/String;Ljava/lang/String;Ljava/lang/String;[II)J
.end method

.method public static native begin(JLjava/lang/String;I)V
.end method

.method public static native next(J)[B
.end method

.method public static native reset(J)V
.end method

.method public static native close(J)V
.end method

.method public static native info(J)Ljava/lang/String;
.end method

.method public static native stateStatus(J)I
.end method

.method public static native promptTokens(J)I
.end method

.method public static native answerTokens(J)[I
.end method
