# The demo chat screen of the offline APK, built in code (no layout resources): a status line (loading,
# then TTFT and tok/s of each answer), the transcript, an input field and a Send button that turns
# into Stop while an answer streams. Model work runs on Worker threads; they post Ui updates back.
.class public Lai/edgellm/demo/ChatActivity;
.super Landroid/app/Activity;
.source "ChatActivity.smali"

# interfaces
.implements Landroid/view/View$OnClickListener;


.field status:Landroid/widget/TextView;

.field transcript:Landroid/widget/TextView;

.field scroll:Landroid/widget/ScrollView;

.field input:Landroid/widget/EditText;

.field send:Landroid/widget/Button;

.field volatile handle:J

.field volatile busy:Z

.field volatile stop:Z

.field volatile maxTokens:I


.method public constructor <init>()V
    .locals 0

    invoke-direct {p0}, Landroid/app/Activity;-><init>()V
    return-void
.end method

.method protected onCreate(Landroid/os/Bundle;)V
    .locals 6

    invoke-super {p0, p1}, Landroid/app/Activity;->onCreate(Landroid/os/Bundle;)V

    new-instance v0, Landroid/widget/LinearLayout;
    invoke-direct {v0, p0}, Landroid/widget/LinearLayout;-><init>(Landroid/content/Context;)V
    const/4 v1, 0x1
    invoke-virtual {v0, v1}, Landroid/widget/LinearLayout;->setOrientation(I)V
    const/16 v1, 0x20
    invoke-virtual {v0, v1, v1, v1, v1}, Landroid/view/View;->setPadding(IIII)V

    # status line
    new-instance v1, Landroid/widget/TextView;
    invoke-direct {v1, p0}, Landroid/widget/TextView;-><init>(Landroid/content/Context;)V
    const-string v2, "Loading the model\u2026"
    invoke-virtual {v1, v2}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V
    iput-object v1, p0, Lai/edgellm/demo/ChatActivity;->status:Landroid/widget/TextView;
    invoke-virtual {v0, v1}, Landroid/view/ViewGroup;->addView(Landroid/view/View;)V

    # transcript in a scroll view that takes the free height (weight 1)
    new-instance v1, Landroid/widget/ScrollView;
    invoke-direct {v1, p0}, Landroid/widget/ScrollView;-><init>(Landroid/content/Context;)V
    iput-object v1, p0, Lai/edgellm/demo/ChatActivity;->scroll:Landroid/widget/ScrollView;
    new-instance v2, Landroid/widget/TextView;
    invoke-direct {v2, p0}, Landroid/widget/TextView;-><init>(Landroid/content/Context;)V
    const/4 v3, 0x1
    invoke-virtual {v2, v3}, Landroid/widget/TextView;->setTextIsSelectable(Z)V
    iput-object v2, p0, Lai/edgellm/demo/ChatActivity;->transcript:Landroid/widget/TextView;
    invoke-virtual {v1, v2}, Landroid/view/ViewGroup;->addView(Landroid/view/View;)V
    new-instance v2, Landroid/widget/LinearLayout$LayoutParams;
    const/4 v3, -0x1
    const/4 v4, 0x0
    const/high16 v5, 0x3f800000    # 1.0f
    invoke-direct {v2, v3, v4, v5}, Landroid/widget/LinearLayout$LayoutParams;-><init>(IIF)V
    invoke-virtual {v0, v1, v2}, Landroid/view/ViewGroup;->addView(Landroid/view/View;Landroid/view/ViewGroup$LayoutParams;)V

    # input
    new-instance v1, Landroid/widget/EditText;
    invoke-direct {v1, p0}, Landroid/widget/EditText;-><init>(Landroid/content/Context;)V
    const-string v2, "Ask something"
    invoke-virtual {v1, v2}, Landroid/widget/TextView;->setHint(Ljava/lang/CharSequence;)V
    iput-object v1, p0, Lai/edgellm/demo/ChatActivity;->input:Landroid/widget/EditText;
    invoke-virtual {v0, v1}, Landroid/view/ViewGroup;->addView(Landroid/view/View;)V

    # Send / Stop, enabled once the model is loaded
    new-instance v1, Landroid/widget/Button;
    invoke-direct {v1, p0}, Landroid/widget/Button;-><init>(Landroid/content/Context;)V
    const-string v2, "Send"
    invoke-virtual {v1, v2}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V
    const/4 v2, 0x0
    invoke-virtual {v1, v2}, Landroid/view/View;->setEnabled(Z)V
    invoke-virtual {v1, p0}, Landroid/view/View;->setOnClickListener(Landroid/view/View$OnClickListener;)V
    iput-object v1, p0, Lai/edgellm/demo/ChatActivity;->send:Landroid/widget/Button;
    invoke-virtual {v0, v1}, Landroid/view/ViewGroup;->addView(Landroid/view/View;)V

    invoke-virtual {p0, v0}, Landroid/app/Activity;->setContentView(Landroid/view/View;)V

    # load the model off the main thread
    new-instance v1, Ljava/lang/Thread;
    new-instance v2, Lai/edgellm/demo/Worker;
    const/4 v3, 0x0
    const/4 v4, 0x0
    invoke-direct {v2, p0, v3, v4}, Lai/edgellm/demo/Worker;-><init>(Lai/edgellm/demo/ChatActivity;ILjava/lang/String;)V
    invoke-direct {v1, v2}, Ljava/lang/Thread;-><init>(Ljava/lang/Runnable;)V
    invoke-virtual {v1}, Ljava/lang/Thread;->start()V
    return-void
.end method

.method public onClick(Landroid/view/View;)V
    .locals 5

    # while an answer streams the button is Stop
    iget-boolean v0, p0, Lai/edgellm/demo/ChatActivity;->busy:Z
    if-eqz v0, :start
    const/4 v0, 0x1
    iput-boolean v0, p0, Lai/edgellm/demo/ChatActivity;->stop:Z
    return-void

    :start
    iget-wide v0, p0, Lai/edgellm/demo/ChatActivity;->handle:J
    const-wide/16 v2, 0x0
    cmp-long v0, v0, v2
    if-eqz v0, :ignore

    iget-object v0, p0, Lai/edgellm/demo/ChatActivity;->input:Landroid/widget/EditText;
    invoke-virtual {v0}, Landroid/widget/EditText;->getText()Landroid/text/Editable;
    move-result-object v0
    invoke-virtual {v0}, Ljava/lang/Object;->toString()Ljava/lang/String;
    move-result-object v0
    invoke-virtual {v0}, Ljava/lang/String;->trim()Ljava/lang/String;
    move-result-object v0
    invoke-virtual {v0}, Ljava/lang/String;->isEmpty()Z
    move-result v1
    if-nez v1, :ignore

    iget-object v1, p0, Lai/edgellm/demo/ChatActivity;->input:Landroid/widget/EditText;
    const-string v2, ""
    invoke-virtual {v1, v2}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V
    const/4 v1, 0x1
    iput-boolean v1, p0, Lai/edgellm/demo/ChatActivity;->busy:Z
    const/4 v1, 0x0
    iput-boolean v1, p0, Lai/edgellm/demo/ChatActivity;->stop:Z
    iget-object v1, p0, Lai/edgellm/demo/ChatActivity;->send:Landroid/widget/Button;
    const-string v2, "Stop"
    invoke-virtual {v1, v2}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V
    iget-object v1, p0, Lai/edgellm/demo/ChatActivity;->status:Landroid/widget/TextView;
    const-string v2, "Thinking\u2026"
    invoke-virtual {v1, v2}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V

    new-instance v1, Ljava/lang/StringBuilder;
    invoke-direct {v1}, Ljava/lang/StringBuilder;-><init>()V
    const-string v2, "\n\nYou: "
    invoke-virtual {v1, v2}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-virtual {v1, v0}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    const-string v2, "\n\nAssistant: "
    invoke-virtual {v1, v2}, Ljava/lang/StringBuilder;->append(Ljava/lang/String;)Ljava/lang/StringBuilder;
    invoke-virtual {v1}, Ljava/lang/StringBuilder;->toString()Ljava/lang/String;
    move-result-object v1
    iget-object v2, p0, Lai/edgellm/demo/ChatActivity;->transcript:Landroid/widget/TextView;
    invoke-virtual {v2, v1}, Landroid/widget/TextView;->append(Ljava/lang/CharSequence;)V

    new-instance v1, Ljava/lang/Thread;
    new-instance v2, Lai/edgellm/demo/Worker;
    const/4 v3, 0x1
    invoke-direct {v2, p0, v3, v0}, Lai/edgellm/demo/Worker;-><init>(Lai/edgellm/demo/ChatActivity;ILjava/lang/String;)V
    invoke-direct {v1, v2}, Ljava/lang/Thread;-><init>(Ljava/lang/Runnable;)V
    invoke-virtual {v1}, Ljava/lang/Thread;->start()V

    :ignore
    return-void
.end method

# kind 0: status text; 1: append to the transcript; 2: an answer (or the load) finished, text = status
.method ui(ILjava/lang/String;)V
    .locals 5

    if-nez p1, :not_status
    iget-object v0, p0, Lai/edgellm/demo/ChatActivity;->status:Landroid/widget/TextView;
    invoke-virtual {v0, p2}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V
    return-void

    :not_status
    const/4 v0, 0x1
    if-ne p1, v0, :finished
    iget-object v0, p0, Lai/edgellm/demo/ChatActivity;->transcript:Landroid/widget/TextView;
    invoke-virtual {v0, p2}, Landroid/widget/TextView;->append(Ljava/lang/CharSequence;)V
    iget-object v0, p0, Lai/edgellm/demo/ChatActivity;->scroll:Landroid/widget/ScrollView;
    const/16 v1, 0x82    # View.FOCUS_DOWN
    invoke-virtual {v0, v1}, Landroid/widget/ScrollView;->fullScroll(I)Z
    return-void

    :finished
    const/4 v0, 0x0
    iput-boolean v0, p0, Lai/edgellm/demo/ChatActivity;->busy:Z
    iget-object v0, p0, Lai/edgellm/demo/ChatActivity;->send:Landroid/widget/Button;
    const-string v1, "Send"
    invoke-virtual {v0, v1}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V
    iget-wide v1, p0, Lai/edgellm/demo/ChatActivity;->handle:J
    const-wide/16 v3, 0x0
    cmp-long v1, v1, v3
    if-eqz v1, :not_loaded
    const/4 v1, 0x1
    invoke-virtual {v0, v1}, Landroid/view/View;->setEnabled(Z)V

    :not_loaded
    iget-object v0, p0, Lai/edgellm/demo/ChatActivity;->status:Landroid/widget/TextView;
    invoke-virtual {v0, p2}, Landroid/widget/TextView;->setText(Ljava/lang/CharSequence;)V
    return-void
.end method

.method post(ILjava/lang/String;)V
    .locals 1

    new-instance v0, Lai/edgellm/demo/Ui;
    invoke-direct {v0, p0, p1, p2}, Lai/edgellm/demo/Ui;-><init>(Lai/edgellm/demo/ChatActivity;ILjava/lang/String;)V
    invoke-virtual {p0, v0}, Landroid/app/Activity;->runOnUiThread(Ljava/lang/Runnable;)V
    return-void
.end method

.method protected onDestroy()V
    .locals 1

    # a streaming answer stops at its next token; the engine itself lives as long as the process
    const/4 v0, 0x1
    iput-boolean v0, p0, Lai/edgellm/demo/ChatActivity;->stop:Z
    invoke-super {p0}, Landroid/app/Activity;->onDestroy()V
    return-void
.end method
