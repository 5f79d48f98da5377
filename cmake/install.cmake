# `cmake --install`: headers, the layer libraries, a CMake package config
# (find_package(usvm) -> usvm::base, usvm::mm, usvm::gpu, usvm::gpusvm,
# usvm::driver, usvm::sim) and the usvm tool. Included from the top-level
# CMakeLists after every layer exists, so the layers' own files stay as
# they are: their public include directory becomes build/install aware
# here.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(USVM_EXPORTED_LAYERS base mm gpu gpusvm driver sim fuzz)
set(USVM_INSTALL_TARGETS usvm_warnings)
foreach(layer ${USVM_EXPORTED_LAYERS})
  set(t usvm_${layer})
  set_target_properties(${t} PROPERTIES
    EXPORT_NAME ${layer}
    INTERFACE_INCLUDE_DIRECTORIES
      "$<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>;$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>")
  list(APPEND USVM_INSTALL_TARGETS ${t})
endforeach()
# usvm_warnings only carries compile options; static libraries name it
# (LINK_ONLY) in their link interface, so it is exported too.
set_target_properties(usvm_warnings PROPERTIES EXPORT_NAME warnings)

install(TARGETS ${USVM_INSTALL_TARGETS} EXPORT usvmTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/usvm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT usvmTargets NAMESPACE usvm:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/usvm)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/usvmConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/usvmConfig.cmake
                              INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/usvm)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/usvmConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/usvmConfig.cmake ${PROJECT_BINARY_DIR}/usvmConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/usvm)
if(TARGET usvm)
  install(TARGETS usvm RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
