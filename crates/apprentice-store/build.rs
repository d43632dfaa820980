// `sqlx::migrate!` embeds the migrations at compile time, but cargo does not know it read them;
// without this a new or edited migration would not trigger a rebuild.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
