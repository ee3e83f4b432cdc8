# A UI update posted from the worker thread: ChatActivity.ui(kind, text) on the main thread.
.class final Lai/edgellm/demo/Ui;
.super Ljava/lang/Object;
.source "Ui.smali"

# interfaces
.implements Ljava/lang/Runnable;


.field private final activity:Lai/edgellm/demo/ChatActivity;

.field private final kind:I

.field private final text:Ljava/lang/String;


.method constructor <init>(Lai/edgellm/demo/ChatActivity;ILjava/lang/String;)V
    .locals 0

    invoke-direct {p0}, Ljava/lang/Object;-><init>()V
    iput-object p1, p0, Lai/edgellm/demo/Ui;->activity:Lai/edgellm/demo/ChatActivity;
    iput p2, p0, Lai/edgellm/demo/Ui;->kind:I
    iput-object p3, p0, Lai/edgellm/demo/Ui;->text:Ljava/lang/String;
    return-void
.end method

.method public run()V
    .locals 3

    iget-object v0, p0, Lai/edgellm/demo/Ui;->activity:Lai/edgellm/demo/ChatActivity;
    iget v1, p0, Lai/edgellm/demo/Ui;->kind:I
    iget-object v2, p0, Lai/edgellm/demo/Ui;->text:Ljava/lang/String;
    invoke-virtual {v0, v1, v2}, Lai/edgellm/demo/ChatActivity;->ui(ILjava/lang/String;)V
    return-void
.end method
