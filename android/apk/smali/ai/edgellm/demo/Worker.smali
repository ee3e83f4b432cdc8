# Model work off the main thread. mode 0: read assets/edgellm/manifest.json, copy the model folder
# out of the APK on first launch (onnxruntime-genai opens files by path), open the engine. mode 1:
# stream one answer, timing the first token (TTFT) and the decode rate, stopping when asked.
.class final Lai/edgellm/demo/Worker;
.super Ljava/lang/Object;
.source "Worker.smali"

# interfaces
.implements Ljava/lang/Runnable;


.field private final activity:Lai/edgellm/demo/ChatActivity;

.field private final mode:I

.field private final question:Ljava/lang/String;


.method constructor <init>(Lai/edgellm/demo/ChatActivity;ILjava/lang/String;)V
    .locals 0

    invoke-direct {p0}, Ljava/lang/Object;-><init>()V
    iput-object p1, p0, Lai/edgellm/demo/Worker;->activity:Lai/edgellm/demo/ChatActivity;
    iput p2, p0, Lai/edgellm/demo/Worker;->mode:I
    iput-object p3, p0, Lai/edgellm/demo/Worker;->question:Ljava/lang/String;
    return-void
.end method

.method public run()V
    .locals 4

    :try_start_0
    iget v0, p0, Lai/edgellm/demo/Worker;->mode:I
    if-nez v0, :load
    invoke-direct {p0}, Lai/edgellm/demo/Worker;->answer()V
    goto :done

    :load
    invoke-direct {p0}, Lai/edgellm/demo/Worker;->load()V

    :done
    :try_end_0
    .catch Ljava/lang/Throwable; {:try_start_0 .. :try_end_0} :failed
    return-void

    :failed
    move-exception v0
    iget-object v1, p0, Lai/edgellm/demo/Worker;->activity:Lai/edgellm/demo/ChatActivity;
    new-instance v2, Ljava/lang/StringBuilder;
    invoke-direct {v2}, Ljava/lang/StringBuilder;-><init>()V
    const-string v3, "Error: "
    invoke-virtual {v2, v3}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-virtual {v2, v0}, Ljava/lang/StringBuilder;->append(Ljava/lang/Object;)Ljava/lang/StringBuilder;
    invoke-virtual {v2}, Ljava/lang/StringBuilder;->toString()Ljava/lang/String;
    move-result-object v2
    const/4 v3, 0x2
    invoke-virtual {v1, v3, v2}, Lai/edgellm/demo/ChatActivity;->post(ILjava/lang/String;)V
    return-void
.end method

.method private load()V
    .locals 8

    iget-object v0, p0, Lai/edgellm/demo/Worker;->activity:Lai/edgellm/demo/ChatActivity;
    const-string v1, "edgellm/manifest.json"
    invoke-direct {p0, v1}, Lai/edgellm/demo/Worker;->readAsset(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v1
    new-instance v2, Lorg/json/JSONObject;
    invoke-direct {v2, v1}, Lorg/json/JSONObject;-><init>(Ljava/lang/String;)V
    invoke-direct {p0, v2}, Lai/edgellm/demo/Worker;->modelDir(Lorg/json/JSONObject;)Ljava/lang/String;
    move-result-object v3
    const-string v1, "runtime"
    invoke-virtual {v2, v1}, Lorg/json/JSONObject;->getJSONObject(Ljava/lang/String;)Lorg/json/JSONObject;
    move-result-object v4
    const-string v1, "chat"
    invoke-virtual {v2, v1}, Lorg/json/JSONObject;->getJSONObject(Ljava/lang/String;)Lorg/json/JSONObject;
    move-result-object v5

    invoke-static {v3, v4, v5}, Lai/edgellm/demo/Worker;->openEngine(Ljava/lang/String;Lorg/json/JSONObject;Lorg/json/JSONObject;)J
    move-result-wide v6

    const-string v1, "max_tokens"
    invoke-virtual {v4, v1}, Lorg/json/JSONObject;->getInt(Ljava/lang/String;)I
    move-result v1
    iput v1, v0, Lai/edgellm/demo/ChatActivity;->maxTokens:I
    iput-wide v6, v0, Lai/edgellm/demo/ChatActivity;->handle:J

    new-instance v1, Ljava/lang/StringBuilder;
    invoke-direct {v1}, Ljava/lang/StringBuilder;-><init>()V
    const-string v2, "Ready \u00b7 "
    invoke-virtual {v1, v2}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-static {v6, v7}, Lai/edgellm/EdgeLLMNative;->info(J)Ljava/lang/String;
    move-result-object v2
    invoke-virtual {v1, v2}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-virtual {v1}, Ljava/lang/StringBuilder;->toString()Ljava/lang/String;
    move-result-object v1
    const/4 v2, 0x2
    invoke-virtual {v0, v2, v1}, Lai/edgellm/demo/ChatActivity;->post(ILjava/lang/String;)V
    return-void
.end method

# EdgeLLMNative.open(path, provider, threads, n_ctx, system_text, turn_prefix, turn_suffix,
#                    no state file, no state tokens, 0 GPU layers), the arguments in v2..v11
.method private static openEngine(Ljava/lang/String;Lorg/json/JSONObject;Lorg/json/JSONObject;)J
    .locals 12

    move-object v2, p0
    const-string v0, "provider"
    invoke-virtual {p1, v0}, Lorg/json/JSONObject;->getString(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v3
    const-string v0, "threads"
    invoke-virtual {p1, v0}, Lorg/json/JSONObject;->getInt(Ljava/lang/String;)I
    move-result v4
    const-string v0, "n_ctx"
    invoke-virtual {p1, v0}, Lorg/json/JSONObject;->getInt(Ljava/lang/String;)I
    move-result v5
    const-string v0, "system_text"
    invoke-virtual {p2, v0}, Lorg/json/JSONObject;->getString(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v6
    const-string v0, "turn_prefix"
    invoke-virtual {p2, v0}, Lorg/json/JSONObject;->getString(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v7
    const-string v0, "turn_suffix"
    invoke-virtual {p2, v0}, Lorg/json/JSONObject;->getString(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v8
    const/4 v9, 0x0
    const/4 v10, 0x0
    const/4 v11, 0x0
    invoke-static/range {v2 .. v11}, Lai/edgellm/EdgeLLMNative;->open(Ljava/lang/String;Ljava/lang/String;IILjava/lang/String;Ljava/lang/String;Ljava/lang/String;Ljava/lang/String;[II)J
    move-result-wide v0
    return-wide v0
.end method

.method private readAsset(Ljava/lang/String;)Ljava/lang/String;
    .locals 5

    iget-object v0, p0, Lai/edgellm/demo/Worker;->activity:Lai/edgellm/demo/ChatActivity;
    invoke-virtual {v0}, Landroid/content/Context;->getAssets()Landroid/content/res/AssetManager;
    move-result-object v0
    invoke-virtual {v0, p1}, Landroid/content/res/AssetManager;->open(Ljava/lang/String;)Ljava/io/InputStream;
    move-result-object v0
    new-instance v1, Ljava/io/ByteArrayOutputStream;
    invoke-direct {v1}, Ljava/io/ByteArrayOutputStream;-><init>()V
    const/16 v2, 0x2000
    new-array v2, v2, [B

    :read
    invoke-virtual {v0, v2}, Ljava/io/InputStream;->read([B)I
    move-result v3
    if-lez v3, :eof
    const/4 v4, 0x0
    invoke-virtual {v1, v2, v4, v3}, Ljava/io/ByteArrayOutputStream;->write([BII)V
    goto :read

    :eof
    invoke-virtual {v0}, Ljava/io/InputStream;->close()V
    invoke-virtual {v1}, Ljava/io/ByteArrayOutputStream;->toByteArray()[B
    move-result-object v1
    new-instance v0, Ljava/lang/String;
    const-string v2, "UTF-8"
    invoke-direct {v0, v1, v2}, Ljava/lang/String;-><init>([BLjava/lang/String;)V
    return-object v0
.end method

# The model folder under the app's files dir, copied from assets/edgellm/model/ once per model
# (manifest "model_dir" carries the model's sha256 prefix; ".complete" marks a finished copy).
.method private modelDir(Lorg/json/JSONObject;)Ljava/lang/String;
    .locals 12

    iget-object v0, p0, Lai/edgellm/demo/Worker;->activity:Lai/edgellm/demo/ChatActivity;
    invoke-virtual {v0}, Landroid/content/Context;->getFilesDir()Ljava/io/File;
    move-result-object v1
    const-string v3, "model_dir"
    invoke-virtual {p1, v3}, Lorg/json/JSONObject;->getString(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v3
    new-instance v2, Ljava/io/File;
    invoke-direct {v2, v1, v3}, Ljava/io/File;-><init>(Ljava/io/File;Ljava/lang/String;)V
    new-instance v4, Ljava/io/File;
    const-string v5, ".complete"
    invoke-direct {v4, v2, v5}, Ljava/io/File;-><init>(Ljava/io/File;Ljava/lang/String;)V
    invoke-virtual {v4}, Ljava/io/File;->exists()Z
    move-result v5
    if-nez v5, :ready

    const/4 v5, 0x0
    const-string v6, "Preparing the model (first launch)\u2026"
    invoke-virtual {v0, v5, v6}, Lai/edgellm/demo/ChatActivity;->post(ILjava/lang/String;)V
    invoke-virtual {v2}, Ljava/io/File;->mkdirs()Z
    const-string v5, "files"
    invoke-virtual {p1, v5}, Lorg/json/JSONObject;->getJSONArray(Ljava/lang/String;)Lorg/json/JSONArray;
    move-result-object v5
    const/high16 v6, 0x10000
    new-array v6, v6, [B
    const/4 v7, 0x0

    :next_file
    invoke-virtual {v5}, Lorg/json/JSONArray;->length()I
    move-result v8
    if-ge v7, v8, :copied
    invoke-virtual {v5, v7}, Lorg/json/JSONArray;->getString(I)Ljava/lang/String;
    move-result-object v8
    new-instance v10, Ljava/lang/StringBuilder;
    invoke-direct {v10}, Ljava/lang/StringBuilder;-><init>()V
    const-string v11, "edgellm/model/"
    invoke-virtual {v10, v11}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-virtual {v10, v8}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-virtual {v10}, Ljava/lang/StringBuilder;->toString()Ljava/lang/String;
    move-result-object v10
    invoke-virtual {v0}, Landroid/content/Context;->getAssets()Landroid/content/res/AssetManager;
    move-result-object v9
    invoke-virtual {v9, v10}, Landroid/content/res/AssetManager;->open(Ljava/lang/String;)Ljava/io/InputStream;
    move-result-object v9
    new-instance v11, Ljava/io/File;
    invoke-direct {v11, v2, v8}, Ljava/io/File;-><init>(Ljava/io/File;Ljava/lang/String;)V
    new-instance v10, Ljava/io/FileOutputStream;
    invoke-direct {v10, v11}, Ljava/io/FileOutputStream;-><init>(Ljava/io/File;)V

    :copy
    invoke-virtual {v9, v6}, Ljava/io/InputStream;->read([B)I
    move-result v11
    if-lez v11, :closed
    const/4 v8, 0x0
    invoke-virtual {v10, v6, v8, v11}, Ljava/io/FileOutputStream;->write([BII)V
    goto :copy

    :closed
    invoke-virtual {v10}, Ljava/io/FileOutputStream;->close()V
    invoke-virtual {v9}, Ljava/io/InputStream;->close()V
    add-int/lit8 v7, v7, 0x1
    goto :next_file

    :copied
    new-instance v5, Ljava/io/FileOutputStream;
    invoke-direct {v5, v4}, Ljava/io/FileOutputStream;-><init>(Ljava/io/File;)V
    invoke-virtual {v5}, Ljava/io/FileOutputStream;->close()V

    :ready
    invoke-virtual {v2}, Ljava/io/File;->getPath()Ljava/lang/String;
    move-result-object v0
    return-object v0
.end method

.method private answer()V
    .locals 14

    iget-object v0, p0, Lai/edgellm/demo/Worker;->activity:Lai/edgellm/demo/ChatActivity;
    iget-wide v1, v0, Lai/edgellm/demo/ChatActivity;->handle:J
    invoke-static {}, Ljava/lang/System;->nanoTime()J
    move-result-wide v3
    iget-object v5, p0, Lai/edgellm/demo/Worker;->question:Ljava/lang/String;
    iget v6, v0, Lai/edgellm/demo/ChatActivity;->maxTokens:I
    invoke-static {v1, v2, v5, v6}, Lai/edgellm/EdgeLLMNative;->begin(JLjava/lang/String;I)V
    const-wide/16 v7, 0x0
    const/4 v9, 0x0

    :loop
    iget-boolean v10, v0, Lai/edgellm/demo/ChatActivity;->stop:Z
    if-nez v10, :end
    invoke-static {v1, v2}, Lai/edgellm/EdgeLLMNative;->next(J)[B
    move-result-object v10
    if-eqz v10, :end
    if-nez v9, :counted
    invoke-static {}, Ljava/lang/System;->nanoTime()J
    move-result-wide v7

    :counted
    add-int/lit8 v9, v9, 0x1
    new-instance v11, Ljava/lang/String;
    const-string v12, "UTF-8"
    invoke-direct {v11, v10, v12}, Ljava/lang/String;-><init>([BLjava/lang/String;)V
    const/4 v12, 0x1
    invoke-virtual {v0, v12, v11}, Lai/edgellm/demo/ChatActivity;->post(ILjava/lang/String;)V
    goto :loop

    :end
    invoke-static {}, Ljava/lang/System;->nanoTime()J
    move-result-wide v10
    new-instance v12, Ljava/lang/StringBuilder;
    invoke-direct {v12}, Ljava/lang/StringBuilder;-><init>()V
    if-nez v9, :stats
    const-string v13, "No answer"
    invoke-virtual {v12, v13}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    goto :report

    :stats
    # TTFT = first - t0 in ms
    const-string v13, "TTFT "
    invoke-virtual {v12, v13}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    sub-long v5, v7, v3
    const-wide/32 v3, 0xf4240
    div-long v5, v5, v3
    invoke-virtual {v12, v5, v6}, Ljava/lang/StringBuilder;->append(J)Ljava/lang/StringBuilder;
    const-string v13, " ms \u00b7 "
    invoke-virtual {v12, v13}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    # decode rate = (n - 1) tokens over (t1 - first), at least 1 ns
    sub-long v10, v10, v7
    add-int/lit8 v13, v9, -0x1
    int-to-long v3, v13
    const-wide/32 v5, 0x3b9aca00
    mul-long v3, v3, v5
    const-wide/16 v5, 0x1
    cmp-long v13, v10, v5
    if-gez v13, :positive
    move-wide v10, v5

    :positive
    div-long v3, v3, v10
    invoke-virtual {v12, v3, v4}, Ljava/lang/StringBuilder;->append(J)Ljava/lang/StringBuilder;
    const-string v13, " tok/s \u00b7 "
    invoke-virtual {v12, v13}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-virtual {v12, v9}, Ljava/lang/StringBuilder;->append(I)Ljava/lang/StringBuilder;
    const-string v13, " tokens"
    invoke-virtual {v12, v13}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;

    :report
    invoke-virtual {v12}, Ljava/lang/StringBuilder;->toString()Ljava/lang/String;
    move-result-object v12
    const/4 v13, 0x2
    invoke-virtual {v0, v13, v12}, Lai/edgellm/demo/ChatActivity;->post(ILjava/lang/String;)V
    return-void
.end method
