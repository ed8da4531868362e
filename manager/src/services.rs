//! Services and tasks, under the name callers know them by
//! (`swarmd_manager::services::ServiceRecord`). The records, their keys and
//! rules and the commands that change them live with the rest of the
//! replicated state, in `state/services.rs` and `state/tasks.rs`.

pub use crate::state::services::*;
pub use crate::state::tasks::*;
