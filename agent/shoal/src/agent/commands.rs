//! Writes the API asks the agent loop to make, grouped by the owner that handles
//! them. Reads never come here: they are served from the published
//! [`super::views::Views`].
//!
//! Every write is answered only once it is durable (on disk, before any frame
//! that carries it leaves), or with the reason it was refused.

use shoal_core::Entry;
use tokio::sync::oneshot;

use super::keys::Binding;
use super::ApiError;
use shoal_api::DeployView;

/// A write request for the agent loop.
pub enum Command {
    /// User kv.
    Kv(KvCommand),
    /// Plugin bindings.
    Plugin(PluginCommand),
    /// Services.
    Service(ServiceCommand),
    /// Image records.
    Image(ImageCommand),
    /// Node marks (drain).
    Node(NodeCommand),
}

/// `shoal node drain`, `undrain` and `forget`.
pub enum NodeCommand {
    /// Forget a down or left node (`forget/<name>`).
    Forget {
        /// The node.
        node: String,
        /// Answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Mark a node drained (`on`) or not.
    Drain {
        /// The node.
        node: String,
        /// Drain (true) or undrain.
        on: bool,
        /// Answer: whether the mark changed.
        reply: oneshot::Sender<Result<bool, ApiError>>,
    },
}

/// `shoal image push` (once the blobs are stored) and `shoal image rm`.
pub enum ImageCommand {
    /// Write an image record.
    Put {
        /// The record.
        record: Box<shoal_image::ImageRecord>,
        /// Answer.
        reply: oneshot::Sender<Result<shoal_image::ImageRecord, ApiError>>,
    },
    /// Delete an image record (its blobs are collected after the grace).
    Remove {
        /// `name:tag`.
        reference: String,
        /// Answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// `shoal kv put` and `rm`.
pub enum KvCommand {
    /// Write (or with `None` delete) a user key.
    Put {
        /// Key.
        key: String,
        /// Value, or `None` to delete.
        value: Option<Vec<u8>>,
        /// Answer.
        reply: oneshot::Sender<Result<Entry, ApiError>>,
    },
}

/// `shoal plugin install` and `rm` (the wasm is validated and stored as a blob
/// before the command is sent).
pub enum PluginCommand {
    /// Bind a stored, validated plugin.
    Bind {
        /// The binding.
        binding: Binding,
        /// Answer.
        reply: oneshot::Sender<Result<Binding, ApiError>>,
    },
    /// Remove a binding (revert to the built-in or cluster default).
    Unbind {
        /// The world.
        kind: shoal_policy::PolicyKind,
        /// Service scope.
        service: Option<String>,
        /// Answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// `shoal deploy`, `scale`, `rollback` and `rm`.
pub enum ServiceCommand {
    /// Create or update a service.
    Deploy {
        /// The validated spec.
        spec: Box<shoal_orch::ServiceSpec>,
        /// Answer.
        reply: oneshot::Sender<Result<DeployView, ApiError>>,
    },
    /// Set a service's desired replicas.
    Scale {
        /// Service.
        name: String,
        /// Replicas.
        replicas: u32,
        /// Answer.
        reply: oneshot::Sender<Result<DeployView, ApiError>>,
    },
    /// Redeploy an earlier version's spec.
    Rollback {
        /// Service.
        name: String,
        /// The version whose spec to deploy; the one before the current by default.
        to: Option<u64>,
        /// Answer.
        reply: oneshot::Sender<Result<DeployView, ApiError>>,
    },
    /// Remove a service.
    Remove {
        /// Service.
        name: String,
        /// Answer.
        reply: oneshot::Sender<Result<DeployView, ApiError>>,
    },
}
